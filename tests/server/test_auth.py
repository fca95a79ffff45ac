"""`--api-key`: every endpoint but /health asks for `Authorization: Bearer KEY`, answering 401
in its own error shape; the key never reaches a log line."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx
import pytest
from sse_client import check_protocol, execute, new_job_id

if TYPE_CHECKING:
    from conftest import RunningServer

KEY = "sk-test-3f9c1a7e"
SERVER_ARGS = ("--api-key", KEY)
GOOD = {"Authorization": f"Bearer {KEY}"}


def test_health_answers_without_the_key(module_server: RunningServer):
    assert httpx.get(f"{module_server.url}/health").status_code == 200


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}], ids=str
)
def test_every_other_endpoint_refuses_a_missing_or_wrong_key(
    module_server: RunningServer, headers: dict[str, str]
):
    url = module_server.url
    refused = execute(url, headers=headers, job_id=new_job_id(), prompt="Hi", max_tokens=2)
    assert refused.status == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert httpx.Response(401, content=refused.raw).json()["code"] == "UNAUTHORIZED"
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions")]:
        response = httpx.request(method, url + path, headers=headers, json={"prompt": "Hi"})
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "UNAUTHORIZED"  # OpenAI's shape
    assert httpx.get(f"{url}/metrics", headers=headers).status_code == 401


def test_the_key_opens_every_endpoint_and_is_never_logged(module_server: RunningServer):
    url = module_server.url
    stream = execute(url, headers=GOOD, job_id=new_job_id(), prompt="Hi", max_tokens=3)
    check_protocol(stream)
    assert httpx.get(f"{url}/v1/models", headers=GOOD).status_code == 200
    assert httpx.get(f"{url}/metrics", headers=GOOD).status_code == 200
    assert KEY not in module_server.log_path.read_text()
    assert KEY not in module_server.out_path.read_text()
