"""GET /admin/models/{name}/progress on a real server: what `warmserve load` polls."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_a_loaded_model_has_all_its_bytes_in_host_memory(server, shared_model):
    with server.http() as http:
        report = http.get(f"/admin/models/{shared_model}/progress").json()
        assert report["state"] == "loaded"
        assert report["bytes_total"] > 0 and report["bytes_done"] == report["bytes_total"]
        missing = http.get("/admin/models/no-such-model/progress")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"
