"""A running ``medcurate serve`` as the HTTP tests talk to it: its URLs, workspace, data root
and a session that sends its bearer token."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import requests

OWN_TOKEN = object()  # call()'s default: this service's token; None sends no token at all


@dataclass
class Live:
    url: str
    jobs_address: str
    workspace: Path
    data: Path
    http: requests.Session
    token: str

    def call(self, method: str, path: str, token=OWN_TOKEN, **kwargs):
        token = self.token if token is OWN_TOKEN else token
        headers = {**kwargs.pop("headers", {}),
                   **({"Authorization": f"Bearer {token}"} if token else {})}
        return self.http.request(method, f"{self.url}{path}", headers=headers,
                                 timeout=kwargs.pop("timeout", 120), **kwargs)

    def job(self, kind: str, params: dict) -> str:
        response = self.call("POST", "/v1/jobs", json={"kind": kind, "params": params})
        assert response.status_code == 202, response.text
        return response.json()["job_id"]

    def wait_job(self, job_id: str, timeout_s: float = 300, until=("SUCCEEDED", "FAILED",
                                                                     "STOPPED")) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            view = self.call("GET", f"/v1/jobs/{job_id}").json()
            if view["status"] in until:
                return view
            time.sleep(1)
        raise AssertionError(f"job {job_id} still {view['status']} after {timeout_s} s")

    def report(self, selection_id: str, timeout_s: float = 180):
        """``GET …/report`` until the report is drawn: 202 with Retry-After until then."""
        return report_when_drawn(lambda: self.call(
            "GET", f"/v1/selections/{selection_id}/report"), timeout_s)


def report_when_drawn(get, timeout_s: float = 180):
    """Repeat ``get()`` while it answers 202 (each with a Retry-After of a few seconds);
    returns the first other answer."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = get()
        if response.status_code != 202:
            return response
        assert 1 <= int(response.headers["Retry-After"]) <= 10, response.headers
        assert response.json()["status"] == "drawing"
        if time.monotonic() > deadline:
            raise AssertionError(f"report still being drawn after {timeout_s} s")
        time.sleep(0.5)
