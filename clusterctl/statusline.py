"""The worker's STATUS= line, defined once: the runtime writes it (sd_notify), `clusterctl status` reads it
back from systemd's StatusText=. Stdlib only, as the worker imports it.

Words of KEY=VALUE, e.g. `served=1204 in_flight=2 errors=0 connections=7 websockets=3`: as readable in
`systemctl status` as prose was, and read back by splitting, not by patterns that must match the prose.
A note for people (why a worker drains) follows `; ` at the end.
"""

from __future__ import annotations

# The fields in the order they are written; every one but `state` and `engine` is a whole number.
FIELDS = ("state", "served", "in_flight", "errors", "connections", "websockets", "engine", "log_dropped")
# Read back as words: the HTTP engine serving (compiled or python). `state` is for people only.
_WORDS = ("engine",)
NOTE = "; "
# The prose line workers before this module sent ("requests served 5, in flight 0, ..."), so `status` still
# reads workers that have not been reloaded onto this version yet.
_LEGACY = {"requests served": "served", "in flight": "in_flight", "errors": "errors", "connections": "connections",
           "websockets": "websockets", "access log lines dropped": "log_dropped"}


def format(*, note: str | None = None, **counters: int | str | None) -> str:
    """`served=5 in_flight=0 ...` from the FIELDS given (None: left out), then `; note` if any."""
    unknown = set(counters) - set(FIELDS)
    if unknown:
        raise ValueError(f"not a STATUS= field: {', '.join(sorted(unknown))}")
    text = " ".join(f"{key}={counters[key]}" for key in FIELDS if counters.get(key) is not None)
    return f"{text}{NOTE}{note}" if note else text


def parse(text: str) -> dict[str, int | str]:
    """The counters (and the engine's name) of a STATUS= line (format's, or the older prose); what is not there
    is not in the dict. `state` and the note are for people reading `systemctl status`, not read back."""
    words, _, _note = text.partition(NOTE)
    out: dict[str, int | str] = {}
    if "=" not in words:
        for part in words.split(", "):
            label, _, number = part.rpartition(" ")
            if label in _LEGACY and number.isdigit():
                out[_LEGACY[label]] = int(number)
        return out
    for word in words.split():
        key, _, value = word.partition("=")
        if key in _WORDS and value:
            out[key] = value
        elif key in FIELDS and key != "state" and value.isdigit():
            out[key] = int(value)
    return out
