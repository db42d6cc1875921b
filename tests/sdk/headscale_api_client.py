"""Drives Hydrascale's /api/v1 with a third-party headscale SDK from PyPI (headscale-api).

Usage: python headscale_api_client.py BASE_URL API_KEY
Prints one JSON object with what the SDK saw; exits non-zero on any failure. The
integration test `rest_api` runs it and checks the output against the server's state.
"""

import asyncio
import datetime
import json
import logging
import sys

from headscale_api.headscale import Headscale, ResponseError
from headscale_api.schema.headscale import v1 as model


async def main(base_url: str, api_key: str) -> dict:
    hs = Headscale(base_url, api_key, logger=logging.WARNING)
    out: dict = {}
    out["health"] = await hs.health_check()
    out["key_ok"] = await hs.test_api_key()
    out["wrong_key_ok"] = await hs.test_api_key("hskey-api-000000000000-" + "0" * 48)

    # This SDK sends every field as a query parameter, never as a body.
    await hs.create_user(model.CreateUserRequest(name="sdk-user"))
    users = await hs.list_users(model.ListUsersRequest())
    out["users"] = sorted(u.name for u in users.users)
    out["user_ids"] = sorted(u.id for u in users.users)
    got = await hs.get_user(model.GetUserRequest(name="sdk-user"))
    out["got_user"] = got.user.name

    expiry = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=2)
    created = await hs.create_api_key(model.CreateApiKeyRequest(expiration=expiry))
    out["new_api_key_prefix"] = created.api_key.split("-")[2] if created.api_key else ""
    out["new_api_key_works"] = await hs.test_api_key(created.api_key)
    keys = await hs.list_api_keys(model.ListApiKeysRequest())
    out["api_key_prefixes"] = sorted(k.prefix for k in keys.api_keys)
    out["api_key_expirations"] = {
        k.prefix: k.expiration.isoformat() for k in keys.api_keys if k.expiration
    }
    await hs.expire_api_key(model.ExpireApiKeyRequest(prefix=out["new_api_key_prefix"]))
    out["expired_api_key_works"] = await hs.test_api_key(created.api_key)

    await hs.rename_user(model.RenameUserRequest(old_name="sdk-user", new_name="sdk-renamed"))
    users = await hs.list_users(model.ListUsersRequest())
    out["users_after_rename"] = sorted(u.name for u in users.users)

    try:
        await hs.delete_user(model.DeleteUserRequest(name="no-such-user"))
        out["delete_missing"] = "accepted"
    except ResponseError as e:
        out["delete_missing"] = e.http_code
    await hs.delete_user(model.DeleteUserRequest(name="sdk-renamed"))
    users = await hs.list_users(model.ListUsersRequest())
    out["users_after_delete"] = sorted(u.name for u in users.users)
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2]))))
