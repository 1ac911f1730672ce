"""A small Server-Sent Events parser (the WHATWG event-stream format), fed one line at a time."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SSEFrame:
    event: str
    data: str
    id: str | None


class SSEParser:
    """Feed decoded lines (without their line terminator); complete frames come back from :meth:`feed`.

    ``retry_ms`` holds the last ``retry:`` value the server sent (the reconnect delay it asks for),
    ``last_event_id`` the last ``id:``.
    """

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []
        self._has_data = False
        self.last_event_id: str | None = None
        self.retry_ms: int | None = None

    def feed(self, line: str) -> SSEFrame | None:
        line = line.rstrip("\r\n")
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment (keepalive)
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
            self._has_data = True
        elif name == "id" and "\x00" not in value:
            self.last_event_id = value
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None

    def _dispatch(self) -> SSEFrame | None:
        if not self._has_data:
            self._event = ""
            return None
        frame = SSEFrame(event=self._event or "message", data="\n".join(self._data), id=self.last_event_id)
        self._event, self._data, self._has_data = "", [], False
        return frame
