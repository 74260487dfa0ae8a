"""Session & scheduler layer: the life cycle of a session, prompt rendering,
and the continuous-batching scheduler that owns the execution backend."""
