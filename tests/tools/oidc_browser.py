#!/usr/bin/env python3
"""Plays the person at the browser for an OIDC login test (stdlib only).

Usage: oidc_browser.py LOGIN_URL USERNAME PASSWORD [approve|cancel|stop]

Opens the machine's login URL on Hydrascale, follows its redirect to the identity
provider, submits the provider's login form (nanoidp's: username, password and its
hidden fields, with its session cookie), follows the provider's redirect back to
Hydrascale's /oidc/callback and, when that shows the "Add this device?" form, presses
Approve (the default) or Cancel, or stops there ("stop"). Prints one JSON line: the step
it ended at, the final status and page text, and what a test needs to play the form
itself: the ticket, Hydrascale's login cookie, and the headers of every Hydrascale page.
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


PAGES = []  # (url, status, headers) of Hydrascale's answers


def call(req, ours=False):
    url = req if isinstance(req, str) else req.full_url
    try:
        r = opener.open(req, timeout=30)
        out = r.status, r.headers, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        out = e.code, e.headers, e.read().decode(errors="replace")
    except urllib.error.URLError as e:
        print(json.dumps({"step": "connect", "status": 0, "body": f"{url}: {e.reason}"}))
        sys.exit(0)
    if ours:
        PAGES.append({"url": url, "status": out[0], "headers": dict(out[1].items())})
    return out


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


def login_cookie():
    return ["%s=%s" % (c.name, c.value) for c in jar if c.name.startswith("hydrascale_login_")]


def main(login_url, username, password, decision="approve"):
    out = run(login_url, username, password, decision)
    out["pages"] = PAGES
    out["cookies"] = login_cookie()
    return out


def run(login_url, username, password, decision):
    status, headers, body = call(login_url, ours=True)
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
    callback = headers["Location"]
    status, headers, body = call(callback, ours=True)
    form = Form()
    form.feed(body)
    if status != 200 or "ticket" not in form.fields or decision == "stop":
        return {"step": "callback", "status": status, "body": body,
                "ticket": form.fields.get("ticket"), "action": form.action}
    target = urllib.parse.urljoin(callback, form.action)
    data = urllib.parse.urlencode(dict(form.fields, decision=decision)).encode()
    origin = "%s://%s" % urllib.parse.urlsplit(callback)[:2]
    req = urllib.request.Request(target, data=data, method="POST", headers={"Origin": origin})
    status, headers, body = call(req, ours=True)
    return {"step": "confirm", "status": status, "body": body, "ticket": form.fields["ticket"]}


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:5])))
