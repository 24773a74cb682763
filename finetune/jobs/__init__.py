"""Retraining jobs: the queue's front door (queue), the worker that runs them (worker), the child process that
trains (child) and how it is launched (launch), what the two say to each other (protocol), the notices people get
(notices) and worker ids (worker_ids)."""
