"""Attached files and pictures, made ready for a user message.

A text file (.txt, .md, code, .json, .csv, ...) or a PDF becomes text wrapped with its name
(`FileText`), counted in the loaded model's tokens and refused with the numbers when it cannot
fit the context. A picture becomes a checked `ImageData` for a vision model. Sizes are checked
before anything is read, a PDF is read in a child process with a time and memory limit
(chat/pdftext.py), and whatever a file does wrong ends in an `AttachmentError` that says what
works, never a crash or a hang. Knows files and a token counter, not Gradio, HTTP or engines.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from backends.base import ImageData, Message, ParamError
from backends.images import ImageError, probe

TEXT_SUFFIXES = frozenset(
    ".txt .text .md .markdown .rst .log .csv .tsv .json .jsonl .ndjson .yaml .yml .toml .ini .cfg .conf .env "
    ".xml .html .htm .css .scss .svg .tex .bib .srt .vtt .py .pyi .ipynb .js .mjs .cjs .ts .tsx .jsx .vue .java "
    ".kt .kts .scala .groovy .c .h .cc .cpp .cxx .hpp .hh .cs .go .rs .rb .php .pl .pm .swift .m .mm .r .jl .lua "
    ".dart .hs .ml .ex .exs .erl .clj .sql .sh .bash .zsh .fish .ps1 .bat .cmake .gradle .proto .graphql .diff "
    ".patch".split())
TEXT_NAMES = frozenset({"makefile", "dockerfile", "readme", "license", "changelog", "gemfile", "procfile"})
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"})
log = logging.getLogger(__name__)
WHAT_WORKS = ("text files (.txt, .md, .csv, .json, code), PDFs (.pdf) and, for vision models, pictures "
              "(.png, .jpg, .webp, .gif, .bmp)")


class AttachmentError(ParamError):
    """An attachment that cannot be used; the message names it, says why and what to do."""


@dataclass(frozen=True)
class AttachLimits:
    """How big an attachment may be. `web.policy.Limits` has the same fields (and flags);
    `AttachLimits.of(limits)` takes them from it."""

    file_bytes: int = 8 * 1024 * 1024  # a text file or PDF, before it is read
    message_chars: int = 100_000  # the text read from one file (it becomes part of a message)
    image_bytes: int = 8 * 1024 * 1024  # one picture, as sent
    image_pixels: int = 20_000_000  # one picture, width x height
    images: int = 16  # pictures in one conversation
    pdf_pages: int = 500
    pdf_seconds: float = 20.0  # reading one PDF, in a child process that is killed after it
    pdf_memory: int = 1024 * 1024 * 1024  # that child's address space

    @classmethod
    def of(cls, limits: Any) -> "AttachLimits":
        """The fields `limits` (e.g. web.policy.Limits) has; the defaults for the rest."""
        if limits is None or isinstance(limits, AttachLimits):
            return limits or cls()
        names = cls.__dataclass_fields__
        return cls(**{n: getattr(limits, n) for n in names if hasattr(limits, n)})


@dataclass(frozen=True)
class FileText:
    """A file read for a message: `text` is what goes into it (the file's text wrapped with its
    name), `tokens` that text's length in the loaded model's tokens."""

    name: str
    text: str
    tokens: int
    pages: int | None = None  # a PDF's


def kind(name: str) -> str | None:
    """Which kind of file a name is: "text", "pdf", "image", or None (one Confab does not read)."""
    path = Path(name)
    suffix = path.suffix.lower()
    if suffix == ".pdf":
        return "pdf"
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in TEXT_SUFFIXES or (not suffix and path.name.lower() in TEXT_NAMES):
        return "text"
    return None


def read_attachment(path: str | os.PathLike[str], manager: Any, limits: Any = None, reserve: int = 0,
                    name: str | None = None) -> "FileText | ImageData":
    """A file a person attached: a `FileText` for text and PDFs (counted with the loaded model of
    `manager`, refused if it cannot fit its context less `reserve` tokens kept for the reply), or
    an `ImageData` for a picture. Raises AttachmentError (a ParamError) with a message to show."""
    name = name or Path(path).name
    what = kind(name)
    if what == "image":
        return read_image(path, name, limits)
    if what is None:
        raise AttachmentError(f"{name}: Confab reads {WHAT_WORKS}.")
    return read_file(path, manager.count_tokens, manager.n_ctx, reserve, limits, name)


def read_attachments(paths: Sequence[str | os.PathLike[str]], manager: Any, limits: Any = None,
                     reserve: int = 0) -> tuple[list[FileText], list[ImageData]]:
    """Every file of one message (e.g. a MultimodalTextbox's `files`): the texts, which must fit
    the context together, and the pictures."""
    files: list[FileText] = []
    images: list[ImageData] = []
    for path in paths:
        got = read_attachment(path, manager, limits, reserve)
        (images if isinstance(got, ImageData) else files).append(got)
    n_ctx, total = manager.n_ctx, sum(f.tokens for f in files)
    if len(files) > 1 and n_ctx and total > n_ctx - reserve:
        kept = f", {reserve:,} of them kept for the reply" if reserve else ""
        raise AttachmentError(f"These {len(files)} files are {total:,} tokens together; the model's context is "
                              f"{n_ctx:,} tokens{kept}; attach fewer or smaller ones.")
    return files, images


def read_file(path: str | os.PathLike[str], count_tokens: Callable[[str], int], n_ctx: int, reserve: int = 0,
              limits: Any = None, name: str | None = None) -> FileText:
    """A text file or PDF as message text, with its token count (`count_tokens`, e.g. the
    manager's); refused when it cannot fit `n_ctx` less `reserve` (0: not checked)."""
    limits = AttachLimits.of(limits)
    name = name or Path(path).name
    data = _read_bytes(path, name, limits.file_bytes, "--max-file-bytes")
    pages = None
    if kind(name) == "pdf":
        text, pages = pdf_text(data, name, limits)
    else:
        text = _decode(data, name)
    if len(text) > limits.message_chars:
        raise _too_many_chars(name, f"{len(text):,}", limits.message_chars)
    if not text.strip():
        raise AttachmentError(f"{name} holds no text" + (" (a scanned PDF? Confab does not read text in pictures)."
                                                           if pages else "."))
    wrapped = wrap(name, text)
    tokens = count_tokens(wrapped)
    if n_ctx and tokens > n_ctx - reserve:
        kept = f", {reserve:,} of them kept for the reply" if reserve else ""
        raise AttachmentError(f"{name} is {tokens:,} tokens; the model's context is {n_ctx:,} tokens{kept}; "
                              "attach a smaller part.")
    return FileText(name, wrapped, tokens, pages)


def wrap(name: str, text: str) -> str:
    """A file's text as the model reads it: between tags that name the file."""
    safe = re.sub(r'["<>\r\n]', "_", name)
    return f'<file name="{safe}">\n{text.strip()}\n</file>'


def read_image(source: str | os.PathLike[str] | bytes, name: str = "", limits: Any = None) -> ImageData:
    """A picture file (or its bytes), checked: size before reading, pixels before decoding, and
    that it decodes. Raises AttachmentError."""
    limits = AttachLimits.of(limits)
    name = name or (Path(source).name if not isinstance(source, bytes) else "the image")
    if isinstance(source, bytes):
        data = source
        if len(data) > limits.image_bytes:
            raise _too_big(name, len(data), limits.image_bytes, "--max-image-bytes")
    else:
        data = _read_bytes(source, name, limits.image_bytes, "--max-image-bytes")
    try:
        mime, width, height = probe(data, name, limits.image_pixels)
    except ImageError as e:
        raise AttachmentError(str(e)) from e
    return ImageData(data, mime, width, height, name)


def image_from_data_url(url: str, limits: Any = None, name: str = "") -> ImageData:
    """A `data:image/...;base64,...` URL (the OpenAI API's image_url, an exported chat) as a
    checked ImageData. Any other URL is refused: the server never fetches what a visitor names."""
    limits = AttachLimits.of(limits)
    if not isinstance(url, str) or url[:5].lower() != "data:":
        raise AttachmentError("Only data URLs (data:image/png;base64,...) are accepted for images; this server "
                              "never fetches a URL.")
    header, comma, encoded = url[5:].partition(",")
    mime, *options = header.lower().split(";")
    if not comma or not mime.startswith("image/") or "base64" not in options:
        raise AttachmentError("An image data URL must be data:image/<type>;base64,<data>.")
    if len(encoded) * 3 // 4 > limits.image_bytes + 3:  # checked before decoding
        raise _too_big(name or "the image", len(encoded) * 3 // 4, limits.image_bytes, "--max-image-bytes")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as e:
        raise AttachmentError(f"The image data URL is not valid base64 ({e}).") from e
    return read_image(data, name or "the image", limits)


def check_images(messages: Sequence[Message], limits: Any = None) -> None:
    """How many pictures one conversation holds (each costs the model hundreds of tokens)."""
    limits = AttachLimits.of(limits)
    n = sum(len(m.images) for m in messages)
    if n > limits.images:
        raise AttachmentError(f"This conversation has {n} pictures; this server takes at most {limits.images} "
                              "(--max-images). Start a new chat for more.")


def user_message(text: str, files: Sequence[FileText] = (), images: Sequence[ImageData] = ()) -> Message:
    """The user's message: the attached files' text first, then what they typed; pictures apart."""
    parts = [f.text for f in files] + ([text] if text.strip() or not files else [])
    return Message("user", "\n\n".join(parts), images=tuple(images))


def pdf_text(data: bytes, name: str, limits: AttachLimits) -> tuple[str, int]:
    """A PDF's text and page count, read by chat/pdftext.py in a child process that is killed
    after `pdf_seconds` and may use at most `pdf_memory` bytes."""
    child = [sys.executable, "-I", str(Path(__file__).with_name("pdftext.py")),
             str(limits.pdf_pages), str(limits.message_chars), str(limits.pdf_memory), json.dumps(sys.path)]
    try:
        done = subprocess.run(child, input=data, capture_output=True, timeout=limits.pdf_seconds)
        result = json.loads(done.stdout or b"{}")
    except subprocess.TimeoutExpired:
        raise AttachmentError(f"{name} took more than {limits.pdf_seconds:g} s to read; it may be damaged or made "
                              "to be slow. Try another copy, or paste the part you need.") from None
    except ValueError:
        result = {}
    if "error" in result or "text" not in result:
        log.warning("reading the PDF %s failed: %s %s", name, result, done.stderr[-500:])
        raise AttachmentError(_pdf_failure(name, result.get("error", ""), limits))
    if result["over"] == "pages":
        raise AttachmentError(f"{name} has {result['pages']:,} pages; Confab reads at most {limits.pdf_pages:,}. "
                              "Attach a smaller part.")
    if result["over"] == "chars":
        raise _too_many_chars(name, "over " + f"{limits.message_chars:,}", limits.message_chars)
    return result["text"], int(result["pages"])


def _pdf_failure(name: str, error: str, limits: AttachLimits) -> str:
    if error == "no pypdf":
        return "Reading PDFs needs pypdf on the server: pip install -r requirements.txt"
    if error == "encrypted":
        return f"{name} is protected by a password; attach an unprotected copy."
    if error == "memory":
        return (f"{name} could not be read within {limits.pdf_memory // 2**20:,} MB of memory; it may be damaged "
                "or made to be huge. Try another copy, or paste the part you need.")
    if error.startswith("LimitReachedError"):  # pypdf's own bound on what a stream unpacks to
        return f"{name} unpacks to far more data than a document needs (damaged, or made to be huge); try another copy."
    if not error:  # the reader died without a word (killed for its memory, or crashed)
        return f"{name} could not be read; it may be damaged or made to be huge. Try another copy."
    return f"{name} is not a PDF Confab can read ({error}); try another copy, or paste the part you need."


def _read_bytes(path: str | os.PathLike[str], name: str, limit: int, flag: str) -> bytes:
    """The file's bytes, its size checked first (and again while reading: it may grow)."""
    try:
        size = os.stat(path).st_size
        if size > limit:
            raise _too_big(name, size, limit, flag)
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise AttachmentError(f"{name} could not be read ({e.strerror or e}).") from e
    if len(data) > limit:
        raise _too_big(name, len(data), limit, flag)
    return data


def _decode(data: bytes, name: str) -> str:
    """Text in UTF-8 (or UTF-16 with its byte order mark); anything with NUL bytes or many
    undecodable bytes is binary, not text."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16").replace("\r\n", "\n")
        except UnicodeDecodeError:
            pass
    elif b"\x00" not in data:
        text = data.decode("utf-8-sig", errors="replace")
        if text.count("\ufffd") <= max(8, len(text) // 100):  # a few stray bytes in a log are fine
            return text.replace("\r\n", "\n")
    raise AttachmentError(f"{name} does not look like text (it holds binary data). Confab reads {WHAT_WORKS}.")


def _too_big(name: str, size: int, limit: int, flag: str) -> AttachmentError:
    smaller = "Send a smaller picture." if "image" in flag else "Attach a smaller file."
    return AttachmentError(f"{name} is {_mb(size)}; this server takes at most {_mb(limit)} ({flag}). {smaller}")


def _too_many_chars(name: str, count: str, limit: int) -> AttachmentError:
    return AttachmentError(f"{name} is {count} characters of text; this server takes at most {limit:,} per message "
                           "(--max-message-chars). Attach a smaller part.")


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n:,} bytes"
