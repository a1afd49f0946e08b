"""stalerl: asynchronous GRPO with controlled staleness, and the lab that measures what it costs."""

__version__ = "0.1.0"
