"""A clock tool: the date and time now, in any IANA time zone."""

from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from chat.tools import tool


@tool
def current_time(timezone: str = "UTC") -> str:
    """The current date and time.

    Args:
        timezone: An IANA time zone name such as "UTC", "Europe/Paris" or "America/New_York".
    """
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {timezone!r}; use an IANA name such as 'Europe/Paris'") from None
    return datetime.now(zone).strftime("%A %d %B %Y, %H:%M:%S %Z")
