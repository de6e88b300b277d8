"""Routing in the HTTP proxy: route prefixes, longest match, 404s, legacy routes, redeploys.

Every app here answers with its own name and the path it saw, so a test can
tell which application a request reached.
"""

from __future__ import annotations

import httpx
import psutil

from ladle import serve
from tests.conftest import wait_for


@serve.deployment
class Named:
    """Answers ``{"app": name, "path": ..., "root_path": ...}``."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def __call__(self, request):
        return {"app": self.name, "path": request.url.path,
                "root_path": request.scope.get("root_path", "")}

    def whoami(self) -> str:
        return self.name


def app_at(client: httpx.Client, path: str) -> str | None:
    """The name of the app that answered ``path``, or None for a 404."""
    response = client.get(path)
    if response.status_code == 404:
        return None
    assert response.status_code == 200, (path, response.status_code, response.text)
    return response.json()["app"]


def proxy_pid() -> int:
    """The pid of this test's HTTP proxy process."""
    pids = []
    for proc in psutil.Process().children(recursive=True):
        try:
            cmdline = proc.cmdline()
        except psutil.Error:
            continue
        if cmdline and cmdline[-1] == "proxy" and proc.status() != psutil.STATUS_ZOMBIE:
            pids.append(proc.pid)
    assert len(pids) == 1, pids
    return pids[0]


def test_longest_prefix_match_across_applications(http_url: str) -> None:
    serve.run(Named.bind("a"), name="a", route_prefix="/a")
    serve.run(Named.bind("ab"), name="ab", route_prefix="/a/b")
    serve.run(Named.bind("other"), name="other", route_prefix="/other")

    with httpx.Client(base_url=http_url, timeout=10) as client:
        assert app_at(client, "/a") == "a"
        assert app_at(client, "/a/") == "a"
        assert app_at(client, "/a/x/y") == "a"
        assert app_at(client, "/a/bc") == "a"  # a prefix matches whole segments only
        assert app_at(client, "/a/b") == "ab"
        assert app_at(client, "/a/b/") == "ab"
        assert app_at(client, "/a/b/c") == "ab"
        assert app_at(client, "/other/thing") == "other"
        assert app_at(client, "/ab") is None
        assert app_at(client, "/abc/d") is None
        assert app_at(client, "/") is None
        assert app_at(client, "/nothing/here") is None

        not_found = client.get("/missing")
        assert not_found.status_code == 404
        assert "/missing" in not_found.text

        # The app sees the full path, with its prefix as root_path.
        seen = client.get("/a/b/c").json()
        assert seen == {"app": "ab", "path": "/a/b/c", "root_path": "/a/b"}

        routes = client.get("/-/routes").json()
        assert routes == {"/a": "a", "/a/b": "ab", "/other": "other"}

        # A root app catches everything no longer prefix claims.
        serve.run(Named.bind("root"), name="root", route_prefix="/")
        assert app_at(client, "/ab") == "root"
        assert app_at(client, "/") == "root"
        assert app_at(client, "/a/b/c") == "ab"
        assert app_at(client, "/a/bc") == "a"

        # Deleting an app takes its prefix away; the longer/shorter neighbours stay.
        serve.delete("ab")
        wait_for(lambda: app_at(client, "/a/b/c") == "a", message="/a/b to fall back to /a")
        assert app_at(client, "/other") == "other"


def test_legacy_deploy_routes_at_deployment_name(http_url: str) -> None:
    @serve.deployment
    def Greeter(request):  # noqa: N802 - the deployment's name is its route
        return f"hello {request.query_params['name']}"

    @serve.deployment(route_prefix="/custom")
    def Custom(request):  # noqa: N802
        return "custom"

    Greeter.deploy()
    Custom.deploy()
    with httpx.Client(base_url=http_url, timeout=10) as client:
        response = client.get("/Greeter", params={"name": "ann"})
        assert response.status_code == 200
        assert response.text == "hello ann"
        assert client.get("/Greeter/sub", params={"name": "bo"}).text == "hello bo"
        assert client.get("/custom").text == "custom"
        assert client.get("/Custom").status_code == 404
        assert client.get("/").status_code == 404


def test_route_prefix_change_on_redeploy_without_restarting_proxy(http_url: str) -> None:
    serve.run(Named.bind("moving"), name="moving", route_prefix="/old")
    with httpx.Client(base_url=http_url, timeout=10) as client:
        assert app_at(client, "/old/x") == "moving"
        assert app_at(client, "/new/x") is None
        pid = proxy_pid()

        serve.run(Named.bind("moving"), name="moving", route_prefix="/new")
        wait_for(lambda: app_at(client, "/new/x") == "moving" and app_at(client, "/old/x") is None,
                 message="the new prefix to answer and the old one to 404")
        assert client.get("/-/routes").json() == {"/new": "moving"}
        assert proxy_pid() == pid


def test_route_prefix_none_is_reachable_by_handle_only(http_url: str) -> None:
    handle = serve.run(Named.bind("hidden"), name="hidden", route_prefix=None)
    serve.run(Named.bind("shown"), name="shown", route_prefix="/shown")
    assert handle.whoami.remote().result(timeout_s=10) == "hidden"
    assert serve.get_app_handle("hidden").whoami.remote().result(timeout_s=10) == "hidden"
    with httpx.Client(base_url=http_url, timeout=10) as client:
        assert app_at(client, "/shown") == "shown"
        assert app_at(client, "/") is None
        assert app_at(client, "/hidden") is None
        assert client.get("/-/routes").json() == {"/shown": "shown"}
