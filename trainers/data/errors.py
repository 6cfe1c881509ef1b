class DataError(Exception):
    """A problem with a dataset on the user's disk (missing file, bad checksum,
    truncated file). The message names the file and what to do about it."""
