#!/usr/bin/env python3
"""Stands in front of a real OIDC provider (nanoidp) and changes one claim (stdlib only).

Usage: claims_proxy.py LISTEN_PORT UPSTREAM_URL RULES_JSON

Passes every request to UPSTREAM_URL as it is (method, path, headers, body) and every
answer back as it is, except the JSON of `/userinfo`: for a subject named in RULES_JSON
(`{"sub": value}`) its `email_verified` becomes `value`, or is removed when `value` is
the string "absent". nanoidp always answers `email_verified: true` and has no setting for
it; providers in the field send it absent, `false`, or as the string "true" (JumpCloud),
and Hydrascale must treat each of those as an unverified address. The provider's issuer
is set to this proxy's URL, so discovery, login, token and JWKS all pass through here.
Prints "ready" once listening.
"""
import http.client
import http.server
import json
import sys
import urllib.parse

HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection"}


def main(port, upstream, rules):
    up = urllib.parse.urlsplit(upstream)

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def forward(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            conn = http.client.HTTPConnection(up.hostname, up.port, timeout=30)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
            conn.request(self.command, self.path, body=body, headers=headers)
            r = conn.getresponse()
            data = r.read()
            if self.path.split("?")[0] == "/userinfo" and r.status == 200:
                info = json.loads(data)
                rule = rules.get(info.get("sub"), None)
                if info.get("sub") in rules:
                    if rule == "absent":
                        info.pop("email_verified", None)
                    else:
                        info["email_verified"] = rule
                    data = json.dumps(info).encode()
            self.send_response(r.status)
            for k, v in r.getheaders():
                if k.lower() not in HOP:
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            conn.close()

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = forward

    server = http.server.ThreadingHTTPServer(("127.0.0.1", int(port)), Handler)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
