"""Reading an upload safely: the body within its limit, the multipart form's file field, the
image decoded in a thread within the memory budget, and the ?top_k= parameter.

    body = await read_body(request, limit, share)
    tensor, name = decode_upload(body, content_type, predictor, share)
"""
import io

from PIL import Image, UnidentifiedImageError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import FormParser, parse_options_header
from starlette.requests import ClientDisconnect

from flower_classifier.data.images import (
    IMAGE_FORMATS,
    MAX_PIXELS,
    UNREADABLE_IMAGE_ERRORS,
    open_image,
    to_rgb,
)
from flower_classifier.serve.answers import BadRequest

UPLOAD_FIELD = "file"
MAX_FORM_PARTS = 8  # a phone's form has one; more is not a photo upload
MAX_BOUNDARY = 70   # characters of a multipart boundary at most (RFC 2046, section 5.1.1)
MAX_TOP_K_DIGITS = 6
# Bytes held per upload byte: the body, then the copy the multipart parser or the decoder reads.
BODY_COPIES = 2
# Bytes held per decoded pixel: Pillow keeps RGB in 4 bytes, and rotation or conversion makes
# one more image of the same size before the first is freed.
DECODED_BYTES_PER_PIXEL = 8


def form_file(body, content_type):
    """(bytes, file name) of the multipart field `file`, parsed with python-multipart in the
    calling (decoding) thread. Bodies with more delimiters than MAX_FORM_PARTS, or a boundary
    longer than RFC 2046's MAX_BOUNDARY, are refused before parsing."""
    content_type, options = parse_options_header(content_type)
    boundary = options.get(b"boundary", b"")
    fix = f"send the photo as the form field '{UPLOAD_FIELD}'."
    if not boundary:
        raise BadRequest(400, f"The multipart form has no boundary in its Content-Type; {fix}")
    if len(boundary) > MAX_BOUNDARY:
        raise BadRequest(400, f"The multipart form's boundary is {len(boundary)} characters long, "
                         f"more than the {MAX_BOUNDARY} RFC 2046 allows; send the form with a "
                         "shorter boundary, as browsers and curl do.")
    if body.count(b"\r\n--" + boundary) > MAX_FORM_PARTS:
        raise BadRequest(400, f"The multipart form has more than {MAX_FORM_PARTS} parts; {fix}")
    fields, files = [], []
    parser = FormParser(
        "multipart/form-data", fields.append, files.append, boundary=boundary,
        # read_body refused bodies over --max_upload_mb already: the whole body fits in memory
        config={"MAX_MEMORY_FILE_SIZE": len(body) + 1, "MAX_BODY_SIZE": len(body) + 1})
    try:
        parser.write(body)
        parser.finalize()
    except (FormParserError, ValueError):
        raise BadRequest(400, f"The multipart form cannot be read; {fix}") from None
    for part in files:
        if part.field_name == UPLOAD_FIELD.encode():
            name = (part.file_name or b"upload").decode("utf-8", "replace")[:255]
            file = part.file_object
            file.seek(0)
            return file.read(), name
    if any(field.field_name == UPLOAD_FIELD.encode() for field in fields):
        raise BadRequest(400, f"The form field '{UPLOAD_FIELD}' holds text, not a file; send the "
                         f"photo as a file upload, as `curl -F {UPLOAD_FIELD}=@photo.jpg` does.")
    names = [(part.field_name or b"").decode("utf-8", "replace")[:40] for part in fields + files]
    raise BadRequest(400, f"The form has no field '{UPLOAD_FIELD}' (fields: "
                     f"{', '.join(names) or 'none'}); {fix}")


def decode_upload(body, content_type, predictor, share):
    """(preprocessed tensor, file name) of the upload, or a BadRequest saying what is wrong with
    it. Runs in a decoding thread: form parsing and pixels never block the event loop."""
    data, name = body, "upload"
    if content_type.startswith("multipart/form-data"):
        data, name = form_file(body, content_type)
    if not data:
        raise BadRequest(400, "The upload is empty; send a photo such as a JPEG or PNG file.")
    try:
        with open_image(io.BytesIO(data), predictor.preprocess.resize) as image:
            share.take(image.width * image.height * DECODED_BYTES_PER_PIXEL)
            rgb = to_rgb(image)
    except Image.DecompressionBombError:
        raise BadRequest(413, f"The image has more pixels than the {MAX_PIXELS} this server "
                         "decodes; send a smaller photo.") from None
    except UNREADABLE_IMAGE_ERRORS as error:
        raise BadRequest(400, f"The upload is not an image that can be read "
                         f"({unreadable_reason(error)}); send a photo such as a JPEG or PNG "
                         "file.") from None
    return predictor.transform(rgb), name


def unreadable_reason(error):
    """What is wrong with an unreadable upload, in the server's words: a decoder's own message
    is not for clients."""
    if isinstance(error, UnidentifiedImageError):
        return f"not a {', '.join(IMAGE_FORMATS[:-1])} or {IMAGE_FORMATS[-1]} image"
    return "the file is truncated" if "truncated" in str(error) else "the file is damaged"


async def read_body(request, limit, share):
    """The request body, refused with 413 as soon as it is known to exceed limit bytes; the
    memory it needs is taken from share as it arrives."""
    too_large = BadRequest(413, f"The upload is larger than the {limit / 1e6:g} MB limit; send a "
                           "smaller photo (the server's --max_upload_mb sets the limit).")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise BadRequest(400, "The Content-Length header is not a number; send the photo "
                             "again.", {"Connection": "close"})
        if int(declared) > limit:
            raise too_large
        share.take(int(declared) * BODY_COPIES)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            if declared is None:
                share.take(len(chunk) * BODY_COPIES)
            chunks.append(chunk)
    except ClientDisconnect:  # nobody is left to read the answer; it only must not log a crash
        raise BadRequest(400, "The upload was cut off before its end; send it again.") from None
    return b"".join(chunks)


def requested_top_k(request, default):
    text = request.query_params.get("top_k")
    if text is None:
        return default
    if not (text.isascii() and text.isdigit()) or len(text) > MAX_TOP_K_DIGITS or int(text) < 1:
        raise BadRequest(400, f"top_k must be a whole number of at least 1, got {text[:20]!r}.")
    return int(text)
