#!/usr/bin/env python3
"""Plays the person at the browser for an OIDC login test (stdlib only).

Usage: oidc_browser.py LOGIN_URL USERNAME PASSWORD

Opens the machine's login URL on Hydrascale, follows its redirect to the identity
provider, submits the provider's login form (nanoidp's: username, password and its
hidden fields, with its session cookie), follows the provider's redirect back to
Hydrascale's /oidc/callback and prints one JSON line: the final status and page text.
"""
import html.parser
import http.cookiejar
import json
import sys
import urllib.error
import urllib.parse
import urllib.request


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *a, **kw):
        return None


jar = http.cookiejar.CookieJar()
opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar), NoRedirect)


def call(req):
    try:
        r = opener.open(req, timeout=30)
        return r.status, r.headers, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode(errors="replace")
    except urllib.error.URLError as e:
        url = req if isinstance(req, str) else req.full_url
        print(json.dumps({"step": "connect", "status": 0, "body": f"{url}: {e.reason}"}))
        sys.exit(0)


class Form(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.action, self.fields, self.inside = None, {}, False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form":
            self.inside, self.action = True, a.get("action")
        elif tag == "input" and self.inside and a.get("name"):
            self.fields[a["name"]] = a.get("value") or ""

    def handle_endtag(self, tag):
        if tag == "form":
            self.inside = False


def main(login_url, username, password):
    status, headers, body = call(login_url)
    if status != 303 and status != 302 and status != 307:
        return {"step": "login url", "status": status, "body": body}
    authorize = headers["Location"]
    status, headers, body = call(authorize)
    if status != 200:
        return {"step": "provider", "status": status, "body": body}
    form = Form()
    form.feed(body)
    fields = dict(form.fields, username=username, password=password)
    target = urllib.parse.urljoin(authorize, form.action) if form.action else authorize
    data = urllib.parse.urlencode(fields).encode()
    status, headers, body = call(urllib.request.Request(target, data=data, method="POST"))
    if status != 302:
        return {"step": "provider login", "status": status, "body": body}
    status, headers, body = call(headers["Location"])
    return {"step": "callback", "status": status, "body": body}


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])))
