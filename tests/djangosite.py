"""A stock Django project as `django-admin startproject` makes it, migrated, with a superuser and two views
added (an ORM write, a StreamingHttpResponse), and the admin login a browser does. Shared by the worker-level
test (tests/test_realapps.py) and the one under real systemd (tests/test_e2e_up.py)."""

from __future__ import annotations

import http.cookiejar
import os
import re
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

PASSWORD = "right-password"

VIEWS = '''
from django.contrib.auth.models import User
from django.http import HttpResponse, StreamingHttpResponse


def signup(request, name):
    User.objects.create_user(name, password="x")  # an ORM write, in the request's own thread
    return HttpResponse(f"users {User.objects.count()}")


def stream(request):
    def rows():
        for user in User.objects.order_by("id").iterator():
            yield f"{user.username}\\n"
    return StreamingHttpResponse(rows(), content_type="text/plain")
'''


def make_site(site: Path) -> Path:
    """startproject mysite into `site`, the two views routed, migrated, user admin / PASSWORD."""
    admin = Path(sys.executable).parent / "django-admin"
    subprocess.run([str(admin) if admin.exists() else "django-admin", "startproject", "mysite", str(site)], check=True)
    (site / "mysite" / "views.py").write_text(VIEWS)
    urls = site / "mysite" / "urls.py"
    text = urls.read_text().replace("from django.urls import path", "from django.urls import path\nfrom mysite import views")
    for quote in ("'", '"'):
        text = text.replace(f"path({quote}admin/{quote}, admin.site.urls),",
                            f"path({quote}admin/{quote}, admin.site.urls),\n    path('signup/<name>', views.signup),\n"
                            "    path('stream', views.stream),")
    assert "views.signup" in text, text
    urls.write_text(text)
    env = {**os.environ, "DJANGO_SUPERUSER_PASSWORD": PASSWORD}
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=site, check=True, env=env)
    subprocess.run([sys.executable, "manage.py", "createsuperuser", "--noinput", "--username", "admin",
                    "--email", "admin@example.com"], cwd=site, check=True, env=env, capture_output=True)
    return site


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def admin_login(base: str, passwords: tuple[str, ...] = ("wrong-password", PASSWORD)) -> list[tuple[int, str, str]]:
    """GET the login page for its CSRF token, then POST each password: [(status, body, Location)]."""
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()), _NoRedirect)
    page = opener.open(base + "/admin/login/", timeout=10).read().decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)
    assert token, page[:500]
    answers = []
    for password in passwords:
        data = urllib.parse.urlencode({"csrfmiddlewaretoken": token.group(1), "username": "admin",
                                       "password": password, "next": "/admin/"}).encode()
        try:
            r = opener.open(urllib.request.Request(base + "/admin/login/?next=/admin/", data=data), timeout=10)
            answers.append((r.status, r.read().decode(), ""))
        except urllib.error.HTTPError as e:
            answers.append((e.code, e.read().decode(errors="replace"), e.headers.get("Location") or ""))
    return answers
