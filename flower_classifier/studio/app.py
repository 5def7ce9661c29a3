"""The studio's web app: one static page and a JSON API over a Studio, behind serve's guards
(Host and Origin checks, security headers, the token, errors as one sentence).

    app = create_app(studio, ServeConfig(host="127.0.0.1"))

    GET  /api/state                   classes, photos, the data check's findings
    GET  /api/decisions               {"decisions": {id: {"label", "at"}}, "elsewhere": N}
    POST /api/decisions               {"decisions": [{"id": N, "label": CLASS or null}, ...]}
    GET  /api/corrections             corrections.json as a download
    POST /api/apply-to-folders        move the decided photos (undo: POST /api/undo-folders)
    GET  /api/photos/{id}/thumb       a re-encoded JPEG (also /image: larger)
    GET  /api/thumbs?ids=1,2,3        those thumbnails in one answer (lengths in X-Lengths)
    POST /api/retrain, GET /api/runs  the quick retrain of the head (studio/retrain.py)
    GET  /api/runs/{id}/model?format=onnx  the latest run's model file (studio/ship.py)
    GET  /api/suggestions             new photos worth labelling, batched (studio/labelling.py)
    POST /api/final, GET /api/final   train.py's default run with the decisions (studio/final.py)
    POST /api/final/camera            serve.py on the final model: its page's address (tryout.py)
"""
import json
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from flower_classifier.data.corrections import (
    CORRECTIONS_FORMAT,
    CORRECTIONS_NAME,
    load_corrections,
)
from flower_classifier.serve.answers import BadRequest
from flower_classifier.serve.app import EXCEPTION_HANDLERS, check_token, gatekeeper
from flower_classifier.studio.labelling import suggested_batches
from flower_classifier.studio.ship import Shipper
from flower_classifier.studio.thumbnails import (
    LARGE_SIDE,
    THUMB_SIDE,
    THUMBNAILS_FOLDER,
    cached_bytes,
    cached_view,
)

STATIC = Path(__file__).resolve().parent / "static"
MAX_BODY = 2_000_000  # bytes of a JSON request
MAX_THUMBS = 240     # thumbnails in one GET /api/thumbs: two gallery pages
IMAGE_CACHE = "private, max-age=3600"


async def read_json(request):
    """The request's JSON object, 413 past MAX_BODY, 400 when it is not JSON."""
    if int(request.headers.get("content-length") or 0) > MAX_BODY:
        raise BadRequest(413, f"The request is larger than {MAX_BODY // 1_000_000} MB; send "
                         "fewer decisions at once.")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise BadRequest(413, f"The request is larger than {MAX_BODY // 1_000_000} MB; send "
                             "fewer decisions at once.")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest(400, "The request body is not JSON; send a JSON object.") from None
    if not isinstance(data, dict):
        raise BadRequest(400, "The request body must be a JSON object.")
    return data


def photo_ids(text):
    """The ids of GET /api/thumbs?ids=1,2,3: 1 to MAX_THUMBS numbers, else a 400 that says so."""
    try:
        ids = [int(part) for part in text.split(",")]
    except ValueError:
        ids = []
    if not 1 <= len(ids) <= MAX_THUMBS or min(ids) < 0:
        raise BadRequest(400, f"ids: 1 to {MAX_THUMBS} photo ids separated by commas, as "
                         "ids=0,1,2.")
    return ids


class StudioRoutes:
    """The API's handlers around one Studio; every route but the page needs the token."""

    def __init__(self, studio, config, trainer=None, final=None):
        self.studio, self.config, self.trainer, self.final = studio, config, trainer, final
        self.thumbnails = studio.save_dir / THUMBNAILS_FOLDER
        self.shipper = Shipper(trainer) if trainer else None

    async def state(self, request):
        check_token(request, self.config.token)
        return JSONResponse(await run_in_threadpool(self.studio.state))

    async def decisions(self, request):
        check_token(request, self.config.token)
        mine, elsewhere = await run_in_threadpool(self.studio.decisions)
        return JSONResponse({"decisions": {str(key): value for key, value in mine.items()},
                             "elsewhere": elsewhere})

    async def decide(self, request):
        check_token(request, self.config.token)
        data = await read_json(request)
        mine, elsewhere = await run_in_threadpool(self.studio.decide, data.get("decisions"))
        return JSONResponse({"decisions": {str(key): value for key, value in mine.items()},
                             "elsewhere": elsewhere})

    async def corrections(self, request):
        """corrections.json as a download: what train.py --corrections takes."""
        check_token(request, self.config.token)
        decisions = await run_in_threadpool(load_corrections, self.studio.corrections_path)
        return JSONResponse({"format": CORRECTIONS_FORMAT, "decisions": decisions}, headers={
            "Content-Disposition": f'attachment; filename="{CORRECTIONS_NAME}"'})

    async def apply_to_folders(self, request):
        """Move the decided photos in the folders (logged; undo puts them back)."""
        check_token(request, self.config.token)
        moved = await run_in_threadpool(self.studio.apply_to_folders)
        return JSONResponse({"moved": moved, "log": str(self.studio.moves_log),
                             "message": f"Moved {moved} photo(s); nothing was deleted. Restart "
                             "studio.py to see the folders as they are now."})

    async def undo_folders(self, request):
        check_token(request, self.config.token)
        back = await run_in_threadpool(self.studio.undo_folders)
        return JSONResponse({"moved_back": back, "message": f"Put {back} photo(s) back. "
                             "Restart studio.py to see the folders as they are now."})

    async def view(self, request, side):
        check_token(request, self.config.token)
        path = self.studio.image_path(request.path_params["photo_id"])
        data = cached_bytes(path, self.thumbnails, side)  # made before: no thread hop
        if data is None:
            data = await run_in_threadpool(
                lambda: cached_view(path, self.thumbnails, side).read_bytes())
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": IMAGE_CACHE})

    async def thumb(self, request):
        return await self.view(request, THUMB_SIDE)

    def thumbnails_of(self, ids):
        """Each photo's thumbnail bytes, made where it is not on disk yet; b"" for a photo that
        cannot be shown (not an image file, undecodable, gone): one card goes without, not
        the whole page."""
        parts = []
        for photo_id in ids:
            try:
                path = self.studio.image_path(photo_id)
                parts.append(cached_view(path, self.thumbnails, THUMB_SIDE).read_bytes())
            except (BadRequest, OSError):
                parts.append(b"")
        return parts

    async def thumbs(self, request):
        """A gallery page's thumbnails in one answer, one JPEG after the other, their lengths
        in X-Lengths: a browser's request costs more than a thumbnail, so one request for the
        page, not one per card."""
        check_token(request, self.config.token)
        ids = photo_ids(request.query_params.get("ids", ""))
        for photo_id in ids:
            self.studio.photo(photo_id)  # 404 for an id with no photo
        parts = await run_in_threadpool(self.thumbnails_of, ids)
        return Response(b"".join(parts), media_type="application/octet-stream", headers={
            "X-Lengths": ",".join(str(len(part)) for part in parts)})

    async def image(self, request):
        return await self.view(request, LARGE_SIDE)

    async def retrain(self, request):
        check_token(request, self.config.token)
        if self.trainer is None:
            raise BadRequest(404, "This studio has no quick retrain.")
        return JSONResponse(await run_in_threadpool(self.trainer.start), status_code=202)

    async def runs(self, request):
        check_token(request, self.config.token)
        if self.trainer is None:
            return JSONResponse({"runs": []})
        return JSONResponse({"runs": await run_in_threadpool(self.trainer.runs_json)})

    async def model(self, request):
        """The run's model exported with its labels inside, as a download (exported once)."""
        check_token(request, self.config.token)
        if self.shipper is None:
            raise BadRequest(404, "This studio has no quick retrain, so no model to download.")
        path = await run_in_threadpool(self.shipper.model_file, request.path_params["run_id"],
                                       request.query_params.get("format", "onnx"))
        return FileResponse(path, media_type="application/octet-stream", filename=path.name)

    async def suggestions(self, request):
        """The new photos worth labelling next, by the latest run that ended well."""
        check_token(request, self.config.token)
        if self.trainer is None or not self.studio.new_ids:
            raise BadRequest(404, "This studio has no new photos; start studio.py with "
                             "--unlabelled FOLDER to label them with the model's help.")
        latest = self.trainer.latest
        if latest is None:
            raise BadRequest(409, "No run has ended yet; the suggestions come from the latest "
                             "run, so wait for the first one.")

        def suggest():
            decided = set(self.studio.decisions()[0])
            readable = self.studio.readable_new()
            return {"run": latest[0], "new": len(self.studio.new_ids),
                    "unreadable": len(self.studio.new_ids) - len(readable),
                    "undecided": sum(photo_id not in decided for photo_id in readable),
                    "batches": suggested_batches(self.studio, latest[1], decided)}
        return JSONResponse(await run_in_threadpool(suggest))

    async def final_model(self, request):
        """POST starts train.py on the folder with the decisions; GET is its progress."""
        check_token(request, self.config.token)
        if self.final is None:
            raise BadRequest(404, "This studio does not train the final model; run train.py "
                             "with --corrections.")
        if request.method == "POST":
            return JSONResponse(await run_in_threadpool(self.final.start), status_code=202)
        return JSONResponse(self.final.status())

    async def camera(self, request):
        """Start serve.py on the final model (once per model) and answer its page's address."""
        check_token(request, self.config.token)
        if self.final is None:
            raise BadRequest(404, "This studio does not train the final model; serve its "
                             "checkpoint with serve.py.")
        return JSONResponse({"url": await run_in_threadpool(self.final.camera_url)})

    async def heatmap(self, request):
        check_token(request, self.config.token)
        if self.trainer is None:
            raise BadRequest(404, "This studio has no trained head to explain.")
        photo_id = request.path_params["photo_id"]
        self.studio.image_path(photo_id)
        png = await run_in_threadpool(self.trainer.heatmap_png, photo_id)
        return Response(png, media_type="image/png")


async def page(request):
    return FileResponse(STATIC / "index.html")


async def health(request):
    return JSONResponse({"status": "ok"})


def create_app(studio, config, trainer=None, final=None):
    """The Starlette app of studio; config: a serve.config.ServeConfig (host, token, origins);
    trainer: its retrain.QuickTrainer, final: its final.FinalTraining (None: no such routes)."""
    routes = StudioRoutes(studio, config, trainer, final)
    table = [
        Route("/", page), Route("/health", health),
        Route("/api/state", routes.state),
        Route("/api/decisions", routes.decisions, methods=["GET"]),
        Route("/api/decisions", routes.decide, methods=["POST"]),
        Route("/api/corrections", routes.corrections),
        Route("/api/apply-to-folders", routes.apply_to_folders, methods=["POST"]),
        Route("/api/undo-folders", routes.undo_folders, methods=["POST"]),
        Route("/api/photos/{photo_id:int}/thumb", routes.thumb),
        Route("/api/thumbs", routes.thumbs),
        Route("/api/photos/{photo_id:int}/image", routes.image),
        Route("/api/photos/{photo_id:int}/heatmap", routes.heatmap),
        Route("/api/retrain", routes.retrain, methods=["POST"]),
        Route("/api/runs", routes.runs),
        Route("/api/runs/{run_id:int}/model", routes.model),
        Route("/api/suggestions", routes.suggestions),
        Route("/api/final", routes.final_model, methods=["GET", "POST"]),
        Route("/api/final/camera", routes.camera, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=table, middleware=[gatekeeper(config)],
                     exception_handlers=EXCEPTION_HANDLERS)
