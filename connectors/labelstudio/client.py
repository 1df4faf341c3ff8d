"""The Label Studio REST client: ``label-studio-sdk`` plus the one thing it lacks.

:class:`LabelStudioClient` is a thin, typed front of the SDK's client (``LabelStudioBase``,
imported on first use): the SDK does authentication (a legacy token is sent as
``Token T``; a personal access token, a JWT, is exchanged at ``/api/token/refresh`` and
refreshed when it expires), pagination (``tasks.list``), retries (429, 408, 409 and 5xx
with backoff; never for creating a prediction, which would create a second one) and
timeouts.  The front turns the SDK's objects into the plain JSON dicts the region
converter reads, and its errors into labeltriage's: :class:`UsageError` (server
unreachable, token refused, project missing) or :class:`InputError` (an answer that is not
what was expected), each naming the URL.

What the SDK lacks and is kept here: **reading a task's image with the token**, under an
image-source policy (:func:`image_url`).  The token goes only to this server's paths that
serve task images — ``/data/upload/…``, ``/data/local-files/?d=…``,
``/storage-data/uploaded/?filepath=…`` and the storage proxies
``/tasks/ID/resolve/`` / ``/tasks/ID/presign/`` (``/projects/ID/…`` too) — after the path is
decoded and normalised, so ``/data/../api/users`` is refused.  Images on other hosts,
``file://`` and other schemes are refused unless the caller allows foreign hosts.
"""

from __future__ import annotations

import os
import posixpath
import re
import urllib.parse
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from connectors.errors import InputError, UsageError

TOKEN_ENV = "LABEL_STUDIO_TOKEN"
DEFAULT_PAGE_SIZE = 100
DEFAULT_TIMEOUT_S = 30.0

_PROJECT_URL = re.compile(
    r"^(?P<base>https?://[^?#]*?)/(?:api/)?projects/(?P<id>\d+)(?:/[^?#]*)?/?(?:[?#].*)?$"
)
_IMAGE_PATHS = (
    re.compile(r"^/data/upload/[^?#]+$"),
    re.compile(r"^/data/local-files/?$"),
    re.compile(r"^/storage-data/uploaded/?$"),
    re.compile(r"^/(?:tasks|projects)/\d+/(?:resolve|presign)/?$"),
)


# -- where the project is ----------------------------------------------------------------


@dataclass(frozen=True)
class ProjectLocation:
    """A Label Studio project: the server's base URL (no trailing slash) and the project id."""

    base_url: str
    project_id: int

    @property
    def url(self) -> str:
        return f"{self.base_url}/projects/{self.project_id}"

    @property
    def origin(self) -> str:
        parts = urllib.parse.urlsplit(self.base_url)
        return f"{parts.scheme}://{parts.netloc}"

    @property
    def prefix(self) -> str:
        """The server's path prefix (``""`` when Label Studio is served at the root)."""
        return urllib.parse.urlsplit(self.base_url).path.rstrip("/")

    def task_url(self, task_id: str | int) -> str:
        """The task in Label Studio's labeling UI (the Data Manager opens it)."""
        return f"{self.url}/data?task={task_id}"


def parse_project_url(source: str) -> ProjectLocation:
    """``http://HOST:PORT[/prefix]/projects/ID[/…]`` → :class:`ProjectLocation`.

    Raises :class:`UsageError` naming the source when it is not such a URL.
    """
    match = _PROJECT_URL.match(source.strip())
    if match is None:
        raise UsageError(
            f"{source!r} is not a Label Studio project URL; expected http(s)://HOST:PORT/projects/ID"
        )
    return ProjectLocation(
        base_url=match.group("base").rstrip("/"), project_id=int(match.group("id"))
    )


def is_project_url(source: str) -> bool:
    return _PROJECT_URL.match(source.strip()) is not None


def resolve_token(storage_options: dict[str, Any] | None) -> str:
    """The API token from ``storage_options["token"]`` or ``$LABEL_STUDIO_TOKEN``."""
    token = (storage_options or {}).get("token") or os.environ.get(TOKEN_ENV)
    if not token:
        raise UsageError(
            f"a Label Studio API token is needed: pass storage_options token=... or set {TOKEN_ENV}"
        )
    return str(token)


# -- the image-source policy ---------------------------------------------------------------


class ImageSourceRefused(InputError):
    """A task's image reference that labeltriage will not read (see the module docstring)."""


def image_url(value: str, location: ProjectLocation, *, allow_foreign: bool = False) -> str:
    """The full URL of a task's image reference, if the image-source policy allows it.

    A server path (``/data/upload/…``) is joined to the server's origin.  Raises
    :class:`ImageSourceRefused` saying why for a path of this server that does not serve
    images, an image on another host (unless ``allow_foreign``), and any other scheme.
    """
    if value.startswith("//"):
        value = f"{urllib.parse.urlsplit(location.base_url).scheme}:{value}"
    elif value.startswith("/"):
        value = location.origin + value
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https"):
        raise ImageSourceRefused(
            f"image {value!r} is not on the Label Studio server (scheme "
            f"{parts.scheme or 'none'!r}); only its own image paths are read",
            file=location.url,
        )
    origin = f"{parts.scheme}://{parts.netloc}"
    if origin != location.origin:
        if allow_foreign:
            return value
        raise ImageSourceRefused(
            f"image {value} is on another host than Label Studio ({location.origin}); "
            "it is not read, and the token is never sent there",
            file=location.url,
        )
    path = urllib.parse.unquote(parts.path)
    if location.prefix:
        if not (path == location.prefix or path.startswith(location.prefix + "/")):
            raise ImageSourceRefused(
                f"image path {parts.path!r} is outside Label Studio's prefix {location.prefix!r}",
                file=location.url,
            )
        path = path[len(location.prefix) :] or "/"
    if "\\" in path or ".." in path.split("/") or posixpath.normpath(path) != path.rstrip("/"):
        raise ImageSourceRefused(
            f"image path {parts.path!r} is not a normalised path", file=location.url
        )
    if not any(pattern.match(path) for pattern in _IMAGE_PATHS):
        raise ImageSourceRefused(
            f"{parts.path!r} is not one of Label Studio's image paths (/data/upload/, "
            "/data/local-files/, storage proxies); the token is not sent there",
            file=location.url,
        )
    return value


# -- the client ----------------------------------------------------------------------------


def _plain(obj: Any) -> Any:
    """An SDK object as the JSON the server sent (lists and dicts pass through)."""
    if isinstance(obj, list):
        return [_plain(o) for o in obj]
    dump = getattr(obj, "model_dump", None)
    if dump is None:
        return obj
    with warnings.catch_warnings():
        # The SDK builds its models without validation; serialising a field whose declared
        # type differs from what the server sent warns, and the value is kept as sent.
        warnings.simplefilter("ignore", UserWarning)
        return dump(mode="json", by_alias=True, exclude_unset=True)


class LabelStudioClient:
    """The few calls labeltriage makes, through ``label-studio-sdk`` (see the module docstring).

    ``httpx_client`` lets tests and callers share a configured :class:`httpx.Client`.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        httpx_client: Any = None,
    ) -> None:
        try:
            from label_studio_sdk.base_client import LabelStudioBase
            from label_studio_sdk.core.api_error import ApiError
        except ImportError as exc:
            raise UsageError(
                f"a live Label Studio project needs label-studio-sdk "
                f"(pip install 'labeltriage[labelstudio]'): {exc}"
            ) from exc

        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        try:
            self.sdk = LabelStudioBase(
                base_url=self.base_url, api_key=token, timeout=timeout, httpx_client=httpx_client
            )
        except ApiError as exc:  # an expired or malformed personal access token
            raise UsageError(f"{self.base_url}: the API token was refused: {exc.body}") from exc

    # -- plumbing --------------------------------------------------------------------------
    def url(self, path: str) -> str:
        return path if "://" in path else f"{self.base_url}/{path.lstrip('/')}"

    def _call(self, what: str, path: str, fn: Any, *, missing_ok: bool = False) -> Any:
        """Run one SDK call; its errors become labeltriage's, naming ``what`` and the URL."""
        import httpx
        from label_studio_sdk.core.api_error import ApiError

        url = self.url(path)
        try:
            return fn()
        except ApiError as exc:
            status = exc.status_code
            if status == 404 and missing_ok:
                return None
            if status in (401, 403):
                raise UsageError(
                    f"{what} {url}: the API token was refused (HTTP {status})"
                ) from exc
            detail = str(exc.body)[:300].replace("\n", " ")
            raise UsageError(f"{what} {url}: HTTP {status}: {detail}") from exc
        except httpx.HTTPError as exc:
            raise UsageError(f"{what} {url}: cannot reach Label Studio: {exc}") from exc

    def auth_header(self) -> str:
        """The ``Authorization`` header the SDK sends (an access token is refreshed first)."""
        headers = self.sdk._client_wrapper.get_headers()
        return str(headers["Authorization"])

    # -- endpoints -------------------------------------------------------------------------
    def project(self, project_id: int) -> dict[str, Any]:
        body = _plain(
            self._call(
                "GET", f"api/projects/{project_id}", lambda: self.sdk.projects.get(id=project_id)
            )
        )
        if not isinstance(body, dict):
            raise InputError("project answer is not a JSON object", file=self.url("api/projects"))
        return body

    def _get_object(self, path: str, fetch: Callable[[], Any]) -> dict[str, Any] | None:
        """The JSON object at ``path`` (read by ``fetch``); ``None`` when it no longer exists."""
        body = _plain(self._call("GET", path, fetch, missing_ok=True))
        return body if isinstance(body, dict) else None

    def task(self, task_id: int | str) -> dict[str, Any] | None:
        """One task with its annotations and predictions; ``None`` when it no longer exists."""
        return self._get_object(f"api/tasks/{task_id}", lambda: self.sdk.tasks.get(id=str(task_id)))

    def iter_tasks(
        self, project_id: int, *, page_size: int = DEFAULT_PAGE_SIZE
    ) -> Iterator[dict[str, Any]]:
        """Every task of the project (with ``annotations`` and ``predictions``), page by page.

        One page is in memory at a time; iteration stops at the ``total`` the server
        reports (or at its "invalid page" answer past the last one).
        """
        pager = self._call(
            "GET",
            "api/tasks",
            lambda: self.sdk.tasks.list(project=project_id, page_size=page_size, fields="all"),
            missing_ok=True,
        )
        if pager is None:
            return
        pages = pager.iter_pages()
        seen = 0
        while True:
            page = self._call("GET", "api/tasks", lambda: next(pages, None), missing_ok=True)
            if page is None:
                return
            tasks = _plain(page.items or [])
            yield from tasks
            seen += len(tasks)
            total = getattr(page.response, "total", None)
            if not tasks or len(tasks) < page_size or (isinstance(total, int) and seen >= total):
                return

    def create_prediction(
        self,
        *,
        task: int,
        result: list[dict[str, Any]],
        model_version: str,
        score: float | None,
    ) -> dict[str, Any]:
        """Create one prediction (never retried: a retry could create a second one)."""
        created = self._call(
            "POST",
            "api/predictions",
            lambda: self.sdk.predictions.create(
                task=task,
                result=result,
                model_version=model_version,
                score=score,
                request_options={"max_retries": 0},
            ),
        )
        body = _plain(created)
        if not isinstance(body, dict) or "id" not in body:
            raise InputError(
                f"prediction answer has no id: {str(body)[:200]}", file=self.url("api/predictions")
            )
        return body

    def prediction(self, prediction_id: int | str) -> dict[str, Any] | None:
        return self._get_object(
            f"api/predictions/{prediction_id}",
            lambda: self.sdk.predictions.get(id=int(prediction_id)),
        )

    def delete_prediction(self, prediction_id: int | str) -> bool:
        """Delete one prediction; ``False`` when it was already gone."""
        done = self._call(
            "DELETE",
            f"api/predictions/{prediction_id}",
            lambda: self.sdk.predictions.delete(id=int(prediction_id)) or True,
            missing_ok=True,
        )
        return done is not None

    def predictions(self, project_id: int) -> list[dict[str, Any]]:
        """Every prediction of the project."""
        found = self._call(
            "GET", "api/predictions", lambda: self.sdk.predictions.list(project=project_id)
        )
        body = _plain(found)
        return [p for p in body if isinstance(p, dict)] if isinstance(body, list) else []

    def update_task_data(self, task_id: int | str, data: dict[str, Any]) -> None:
        """Replace a task's ``data`` (the caller merges it with the current one)."""
        self._call(
            "PATCH",
            f"api/tasks/{task_id}",
            lambda: self.sdk.tasks.update(id=str(task_id), data=data),
        )

    def import_tasks(self, project_id: int, tasks: list[dict[str, Any]]) -> None:
        self._call(
            "POST",
            f"api/projects/{project_id}/import",
            lambda: self.sdk.projects.import_tasks(id=project_id, request=tasks),
        )

    def fetch(self, url: str) -> bytes:
        """The bytes at ``url`` with the token; callers pass only URLs :func:`image_url` allowed."""
        http = self.sdk._client_wrapper.httpx_client.httpx_client
        response = self._call(
            "GET",
            url,
            lambda: http.get(
                url, headers={"Authorization": self.auth_header()}, timeout=self.timeout
            ),
        )
        if response.status_code != 200:
            raise InputError(f"cannot read the image: HTTP {response.status_code}", file=url)
        return bytes(response.content)


__all__ = [
    "DEFAULT_PAGE_SIZE",
    "DEFAULT_TIMEOUT_S",
    "TOKEN_ENV",
    "ImageSourceRefused",
    "LabelStudioClient",
    "ProjectLocation",
    "image_url",
    "is_project_url",
    "parse_project_url",
    "resolve_token",
]
