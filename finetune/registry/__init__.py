"""The adapter registry: version folders (folders), training and evaluating candidates (candidates), promotion
and rollback (promotion), merged export (export)."""
