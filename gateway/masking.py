"""Masking secrets in traces: every byte of every occurrence of a masked value is hidden, also
where occurrences overlap, and each run of hidden bytes becomes one `[MASKED]`. The runner masks
what it sends with the streaming `Masker` (chunk boundaries cannot split a secret past it); the
server masks again with `mask_all` when a trace is read."""

from __future__ import annotations

from collections.abc import Iterable

MASK = b"[MASKED]"


class Masker:
    """Masks every occurrence of the secrets in a byte stream, whatever the chunking.

    Every byte that belongs to an occurrence of a secret is hidden, also where occurrences
    overlap (`abcd` and `cdef` in `abcdef`); each maximal run of hidden bytes becomes one `MASK`.
    `feed` returns the bytes that are safe to send now and holds back the shortest tail that
    could still turn into a secret (at most `max(len(secret)) - 1` bytes) until later bytes or
    `flush` decide it. The concatenated output always equals `mask_all` of the whole stream.
    """

    def __init__(self, secrets: Iterable[str | bytes], mask: bytes = MASK) -> None:
        self._secrets = _secret_bytes(secrets)
        self._mask = mask
        self._carry = b""
        self._covered = 0  # leading bytes of the carry hidden by an occurrence already seen
        self._in_mask = False  # the output so far ends inside a run of hidden bytes

    @property
    def held(self) -> int:
        """How many bytes are held back, waiting for the next chunk."""
        return len(self._carry)

    def feed(self, data: bytes) -> bytes:
        """Mask `data` (following what was fed before); return what can be sent now."""
        if not self._secrets:
            return data
        buffer = self._carry + data
        return self._emit(buffer, self._first_undecided(buffer))

    def flush(self) -> bytes:
        """The end of the stream: mask and return everything still held."""
        buffer = self._carry
        out = self._emit(buffer, len(buffer)) if self._secrets else buffer
        self._carry, self._covered, self._in_mask = b"", 0, False
        return out

    def _first_undecided(self, buffer: bytes) -> int:
        """The first position whose rest of the buffer is a proper prefix of a secret: only
        later bytes can tell whether a secret starts there (the buffer's length if none)."""
        longest = len(self._secrets[0])
        for pos in range(max(0, len(buffer) - longest + 1), len(buffer)):
            tail = buffer[pos:]
            if any(len(s) > len(tail) and s.startswith(tail) for s in self._secrets):
                return pos
        return len(buffer)

    def _emit(self, buffer: bytes, hold: int) -> bytes:
        """Emit `buffer[:hold]` masked and keep the rest. Every occurrence that could hide a byte
        before `hold` starts before it, so is complete in the buffer."""
        if hold == 0:
            self._carry = buffer
            return b""
        spans = [(0, self._covered)] if self._covered else []
        for secret in self._secrets:
            at = buffer.find(secret)
            while -1 < at < hold:
                spans.append((at, at + len(secret)))
                at = buffer.find(secret, at + 1)
        spans.sort()
        out: list[bytes] = []
        pos = 0
        reach = 0
        index = 0
        while index < len(spans):
            run_start, run_end = spans[index]
            index += 1
            while index < len(spans) and spans[index][0] <= run_end:
                run_end = max(run_end, spans[index][1])
                index += 1
            out.append(buffer[pos:run_start])
            if not (run_start == 0 and self._in_mask):
                out.append(self._mask)
            pos = min(run_end, hold)
            reach = max(reach, run_end)
        out.append(buffer[pos:hold])
        self._in_mask = pos == hold and reach > 0
        self._covered = max(0, reach - hold)
        self._carry = buffer[hold:]
        return b"".join(out)


def mask_all(data: bytes, secrets: Iterable[str | bytes], mask: bytes = MASK) -> bytes:
    """One-shot masking of a whole byte string: the reference `Masker` streams to."""
    hidden = bytearray(len(data))
    for secret in _secret_bytes(secrets):
        at = data.find(secret)
        while at != -1:
            hidden[at : at + len(secret)] = b"\x01" * len(secret)
            at = data.find(secret, at + 1)
    out = bytearray()
    for pos, byte in enumerate(data):
        if not hidden[pos]:
            out.append(byte)
        elif pos == 0 or not hidden[pos - 1]:
            out += mask
    return bytes(out)


def _secret_bytes(secrets: Iterable[str | bytes]) -> tuple[bytes, ...]:
    """Distinct non-empty secrets as bytes, longest first."""
    values = {s.encode() if isinstance(s, str) else s for s in secrets}
    return tuple(sorted((v for v in values if v), key=len, reverse=True))
