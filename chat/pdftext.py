"""A PDF's text, read in a child process: `python -I pdftext.py MAX_PAGES MAX_CHARS MAX_MEMORY_BYTES
[PATHS_JSON]` with the PDF on stdin writes one JSON object on stdout: {"pages", "text", "over"} or
{"error"}. PATHS_JSON (the parent's sys.path) is searched last, after the standard library and
site-packages, so a pypdf found only through PYTHONPATH is still found and nothing shadows them.

chat/attachments.py runs this with a time limit; it caps its own memory first, so a PDF built
to be slow or huge (a decompression bomb, a page tree without end) is killed or fails here,
never in the server. It stops at MAX_PAGES pages or MAX_CHARS characters ("over" says which).
Runs as a plain script (imports only the standard library and pypdf), never imported.
"""

import io
import json
import logging
import sys


def _limit_memory(max_bytes: int) -> None:
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (max_bytes, max_bytes))
    except (ImportError, ValueError, OSError):  # not on this platform: the time limit still holds
        pass


def read(data: bytes, max_pages: int, max_chars: int) -> dict:
    import pypdf

    reader = pypdf.PdfReader(io.BytesIO(data))
    if reader.is_encrypted and not reader.decrypt(""):
        return {"error": "encrypted"}
    pages = len(reader.pages)
    if pages > max_pages:
        return {"pages": pages, "text": "", "over": "pages"}
    texts, total = [], 0
    for page in reader.pages:
        text = (page.extract_text() or "").strip()
        texts.append(text)
        total += len(text) + 2
        if total > max_chars:
            return {"pages": pages, "text": "", "over": "chars"}
    return {"pages": pages, "text": "\n\n".join(t for t in texts if t), "over": None}


def main() -> None:
    max_pages, max_chars, max_memory = (int(a) for a in sys.argv[1:4])
    sys.path += [p for p in json.loads(sys.argv[4]) if p not in sys.path] if len(sys.argv) > 4 else []
    _limit_memory(max_memory)
    logging.disable(logging.WARNING)  # pypdf warns about every oddity it repairs
    data = sys.stdin.buffer.read()
    try:
        result = read(data, max_pages, max_chars)
    except ImportError:
        result = {"error": "no pypdf"}
    except MemoryError:
        result = {"error": "memory"}
    except Exception as e:  # noqa: BLE001 - whatever a broken file raises becomes one message
        result = {"error": f"{type(e).__name__}: {e}"[:300]}
    sys.stdout.write(json.dumps(result))


if __name__ == "__main__":
    main()
