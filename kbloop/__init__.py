"""kbloop: the command root that joins store, finetune, bot and playground."""

__version__ = "0.1.0"
