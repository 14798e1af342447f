"""Attached files become part of a message: text files and PDFs (made here, by hand) read to text
with their token count in the loaded model's tokenizer, refused with the numbers when too big, and
hostile files (malformed, a decompression bomb, too many pages, too slow) refused in one clean
line; pictures read and checked."""

from __future__ import annotations

import time
import zlib

import pytest

from backends.base import ImageData, Message, ParamError
from chat.attachments import (AttachLimits, AttachmentError, FileText, image_from_data_url, read_attachment,
                              read_attachments, read_image, user_message, wrap)
from conftest import hf_spec, loaded

pytestmark = pytest.mark.timeout(120)


def make_pdf(pages: list[str | bytes]) -> bytes:
    """A minimal valid PDF, written by hand: one Helvetica text line per page (a `bytes` page is a
    ready FlateDecode content stream)."""
    kids = " ".join(f"{4 + 2 * i} 0 R" for i in range(len(pages)))
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>".encode(),
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    for i, page in enumerate(pages):
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> "
                       f">> /Contents {5 + 2 * i} 0 R >>".encode())
        content, flate = (page, b" /Filter /FlateDecode") if isinstance(page, bytes) else \
            (f"BT /F1 12 Tf 72 720 Td ({page}) Tj ET".encode(), b"")
        objects.append(b"<< /Length %d%s >>\nstream\n" % (len(content), flate) + content + b"\nendstream")
    out, offsets = b"%PDF-1.4\n", []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    return out + b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)


@pytest.fixture(scope="module")
def manager(tiny_model_dir):
    """The tiny Llama (a 512-token context) loaded, for its tokenizer."""
    with loaded(hf_spec(tiny_model_dir)) as manager:
        yield manager


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def test_a_pdf_made_here_is_read_to_text_with_its_token_count(tmp_path, manager):
    path = write(tmp_path, "report.pdf", make_pdf(["The capital of France is Paris.", "Hello there, how are you?"]))
    got = read_attachment(path, manager, reserve=64)
    assert isinstance(got, FileText) and got.pages == 2
    assert got.text == '<file name="report.pdf">\nThe capital of France is Paris.\n\nHello there, how are you?\n</file>'
    assert got.tokens == manager.count_tokens(got.text) == len(manager.render([Message("user", got.text)])
                                                                  .token_ids) - len(manager.render(
                                                                      [Message("user", "")]).token_ids)


def test_text_and_code_files_keep_their_text_and_name(tmp_path, manager):
    got = read_attachment(write(tmp_path, "notes.md", "# Title\r\nthe quick brown fox\r\n"), manager)
    assert got.text == '<file name="notes.md">\n# Title\nthe quick brown fox\n</file>'
    code = read_attachment(write(tmp_path, "app.py", "print('<|im_start|>')\n"), manager)
    assert "print('<|im_start|>')" in code.text and code.tokens > 5  # control tokens stay text
    utf16 = read_attachment(write(tmp_path, "data.csv", "a,b\n1,é\n".encode("utf-16")), manager)
    assert "1,é" in utf16.text


def test_a_file_too_big_for_the_context_is_refused_with_the_numbers(tmp_path, manager):
    path = write(tmp_path, "book.txt", "the quick brown fox jumps over the lazy dog. " * 200)
    with pytest.raises(AttachmentError) as err:
        read_attachment(path, manager, reserve=100)
    tokens = manager.count_tokens(wrap("book.txt", path.read_text()))
    assert str(err.value) == (f"book.txt is {tokens:,} tokens; the model's context is 512 tokens, 100 of them kept "
                              "for the reply; attach a smaller part.")


def test_files_that_fit_alone_but_not_together_are_refused_together(tmp_path, manager):
    text = "the quick brown fox jumps over the lazy dog. " * 25
    paths = [write(tmp_path, f"part{i}.txt", text) for i in range(3)]
    each = read_attachment(paths[0], manager).tokens
    with pytest.raises(AttachmentError, match=f"^These 3 files are {3 * each:,} tokens together; the model's context "
                                              "is 512 tokens; attach fewer or smaller ones"):
        read_attachments(paths, manager)


def test_sizes_are_checked_before_reading(tmp_path, manager):
    path = write(tmp_path, "big.log", "x" * 5000)
    with pytest.raises(AttachmentError, match=r"big.log is 5,000 bytes; this server takes at most 1,000 bytes "
                                              r"\(--max-file-bytes\)"):
        read_attachment(path, manager, AttachLimits(file_bytes=1000))
    with pytest.raises(AttachmentError, match=r"5,000 characters .* at most 1,000 per message"):
        read_attachment(path, manager, AttachLimits(message_chars=1000))


def test_binary_and_unknown_files_say_what_works(tmp_path, manager):
    with pytest.raises(AttachmentError, match=r"^blob.txt does not look like text .* PDFs \(.pdf\)"):
        read_attachment(write(tmp_path, "blob.txt", bytes(range(256)) * 4), manager)
    with pytest.raises(AttachmentError, match=r"^song.mp3: Confab reads text files \(.txt, .md, .csv, .json, code\), "
                                              r"PDFs \(.pdf\) and, for vision models, pictures"):
        read_attachment(write(tmp_path, "song.mp3", b"ID3"), manager)
    with pytest.raises(AttachmentError, match="could not be read"):
        read_attachment(tmp_path / "missing.txt", manager)


@pytest.mark.parametrize("data, words", [
    (b"%PDF-1.4\n1 0 obj << /Type /Catalog >> garbage \x00\x01 trailer", "is not a PDF Confab can read"),
    (b"", "is not a PDF Confab can read"),
    (make_pdf(["ok"])[:200], "is not a PDF Confab can read"),
])
def test_a_malformed_pdf_is_refused_cleanly(tmp_path, manager, data, words):
    with pytest.raises(AttachmentError, match=f"^broken.pdf {words}") as err:
        read_attachment(write(tmp_path, "broken.pdf", data), manager)
    assert "\n" not in str(err.value)


def test_a_decompression_bomb_pdf_is_refused_quickly(tmp_path, manager):
    bomb = zlib.compress(b"BT /F1 12 Tf 72 720 Td (x) Tj ET " * 3_000_000, 9)  # ~100 MB unpacked from ~300 kB
    path = write(tmp_path, "bomb.pdf", make_pdf(["fine", bomb]))
    start = time.monotonic()
    with pytest.raises(AttachmentError, match=r"^bomb.pdf unpacks to far more data than a document needs"):
        read_attachment(path, manager)
    assert time.monotonic() - start < 15


def test_pages_characters_and_time_are_bounded(tmp_path, manager):
    path = write(tmp_path, "long.pdf", make_pdf([f"page {i} " + "word " * 20 for i in range(5)]))
    with pytest.raises(AttachmentError, match=r"^long.pdf has 5 pages; Confab reads at most 3\. Attach a smaller part"):
        read_attachment(path, manager, AttachLimits(pdf_pages=3))
    with pytest.raises(AttachmentError, match=r"^long.pdf is over 200 characters of text"):
        read_attachment(path, manager, AttachLimits(message_chars=200))
    with pytest.raises(AttachmentError, match=r"^long.pdf took more than 0.01 s to read"):  # the reader is killed
        read_attachment(path, manager, AttachLimits(pdf_seconds=0.01))


def test_a_pdf_without_text_says_so(tmp_path, manager):
    with pytest.raises(AttachmentError, match=r"holds no text \(a scanned PDF"):
        read_attachment(write(tmp_path, "scan.pdf", make_pdf([""])), manager)


def test_pictures_are_read_and_checked(tmp_path, manager):
    from test_vision import picture

    png = picture(1).data
    image = read_attachment(write(tmp_path, "cat.PNG", png), manager)
    assert isinstance(image, ImageData) and (image.mime, image.width, image.height, image.name) == \
        ("image/png", 40, 48, "cat.PNG")
    assert image_from_data_url(image.data_url()) == ImageData(png, "image/png", 40, 48, "the image")
    with pytest.raises(AttachmentError, match=r"^fake.jpg is not a picture Confab can read"):
        read_image(write(tmp_path, "fake.jpg", b"\xff\xd8 not really"))
    with pytest.raises(AttachmentError, match=r"1,920 pixels\); this server takes at most 100 pixels"):
        read_image(png, "small.png", AttachLimits(image_pixels=100))


def test_a_user_message_puts_the_files_first_and_keeps_the_pictures(tmp_path, manager):
    from test_vision import picture

    files, images = read_attachments([write(tmp_path, "a.txt", "alpha"), write(tmp_path, "p.png", picture(1).data)],
                                     manager)
    assert images[0].data == picture(1).data
    message = user_message("Summarise this.", files, [picture(1)])
    assert message.content == '<file name="a.txt">\nalpha\n</file>\n\nSummarise this.'
    assert message.role == "user" and message.images == (picture(1),)
    assert isinstance(AttachmentError("x"), ParamError)


def test_the_servers_limits_carry_over():
    from web.policy import Limits

    limits = AttachLimits.of(Limits(file_bytes=10, image_pixels=20, message_chars=30))
    assert (limits.file_bytes, limits.image_pixels, limits.message_chars, limits.pdf_pages) == (10, 20, 30, 500)
