"""A record's event time, read the same way by the ingest core (a batch's default time)
and by normalize (the hour a record is filed under); here so proto needs no pipeline."""

# Year 10000 starts here; later times cannot be written as %Y and are refused.
MAX_EVENT_TIME = 253402300800.0


def event_time_of(value: object) -> float | None:
    """A record's `time` as epoch seconds, or None when it is not a usable time."""
    if type(value) is int or type(value) is float:  # the usual case (bool is not int here)
        return float(value) if 0 <= value < MAX_EVENT_TIME else None
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, int | float) and 0 <= value < MAX_EVENT_TIME:
        return float(value)
    return None
