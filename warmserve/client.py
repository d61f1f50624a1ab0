"""A small HTTP client for a running warmserve server's admin routes (used by the CLI)."""

from __future__ import annotations

import httpx

# A load reads the checkpoint from disk and may wait for workers: allow as long as the server.
LOAD_TIMEOUT_S = 660.0
REQUEST_TIMEOUT_S = 30.0


class ServerError(Exception):
    """The server refused the request or could not be reached; the message is one line."""


class AdminClient:
    def __init__(self, url: str, api_key: str | None = None):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=REQUEST_TIMEOUT_S)

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs) -> dict | list:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise ServerError(f"{self.url} did not answer {method} {path} in time") from exc
        except httpx.HTTPError as exc:
            raise ServerError(f"cannot reach warmserve at {self.url}: {exc}") from exc
        if response.is_success:
            return response.json()
        raise ServerError(describe_error(response))

    def load(
        self,
        name: str,
        path: str,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        max_model_len: int | None = None,
        port: int | None = None,
    ) -> dict:
        body = {"name": name, "path": path, "tensor_parallel_size": tensor_parallel_size}
        body["dtype"] = dtype
        if max_model_len is not None:
            body["max_model_len"] = max_model_len
        if port is not None:
            body["port"] = port
        return self._request("POST", "/admin/models", json=body, timeout=LOAD_TIMEOUT_S)

    def unload(self, name: str) -> dict:
        return self._request("DELETE", f"/admin/models/{name}", timeout=LOAD_TIMEOUT_S)

    def load_progress(self, name: str) -> dict:
        return self._request("GET", f"/admin/models/{name}/progress")

    def models(self) -> list[dict]:
        return self._request("GET", "/admin/models")

    def workers(self) -> list[dict]:
        return self._request("GET", "/admin/workers")


def describe_error(response: httpx.Response) -> str:
    try:
        error = response.json()["error"]
        return f"{error['message']} (HTTP {response.status_code}, {error['code']})"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text.strip()[:200]}"
