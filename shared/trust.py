"""Decentralized bus auth: an operator, a system account and the cadre account, as NATS JWTs signed with nkeys.

The servers trust the operator's public key and nothing else. Every user (a service, an agent host, a person)
gets a JWT that the cadre account signs, carrying its role's permissions (:mod:`shared.auth`), delivered in a
``.creds`` file with the user's own nkey seed. A new host therefore joins with its file alone: no server config
changes, no restart. Revoking a user adds its key to the account JWT's revocations and pushes the re-signed
account to the servers (``$SYS.REQ.CLAIMS.UPDATE``); they drop its connections and refuse it from then on.

The keys live in a keystore folder (mode 0700, seeds 0600) on the operator's machine, like ``nsc``'s: what was
issued is listed in ``users.json`` (names, roles, public keys; never a seed). A user's seed is only ever in the
creds file handed out.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.exceptions
import nacl.signing
import nkeys

from shared.auth import Permissions
from shared.errors import ConflictError, NotFoundError, ValidationError

ACCOUNT = "CADRE"
SYSTEM_ACCOUNT = "SYS"
UNLIMITED = -1
_KINDS = {"operator": nkeys.PREFIX_BYTE_OPERATOR, "account": nkeys.PREFIX_BYTE_ACCOUNT, "user": nkeys.PREFIX_BYTE_USER}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_seed(kind: str) -> str:
    """A fresh nkey seed for an operator, account or user key (``SO…``, ``SA…``, ``SU…``)."""
    return nkeys.encode_seed(os.urandom(32), _KINDS[kind]).decode()


def public_key(seed: str) -> str:
    return nkeys.from_seed(seed.encode()).public_key.decode()


def encode(
    claims_type: str, name: str, subject: str, issuer_seed: str, nats: dict[str, Any], expires: int | None = None
) -> str:
    """A JWT as nats-server reads it: ed25519-nkey signed, its id the SHA-512/256 of the claims."""
    signer = nkeys.from_seed(issuer_seed.encode())
    claims: dict[str, Any] = {
        "jti": "",
        "iat": int(time.time()),
        "iss": signer.public_key.decode(),
        "name": name,
        "sub": subject,
        "nats": {**nats, "type": claims_type, "version": 2},
    }
    if expires is not None:
        claims["exp"] = expires
    digest = hashlib.new("sha512_256", json.dumps(claims, separators=(",", ":")).encode()).digest()
    claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
    head = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}, separators=(",", ":")).encode())
    body = _b64(json.dumps(claims, separators=(",", ":")).encode())
    return f"{head}.{body}.{_b64(signer.sign(f'{head}.{body}'.encode()))}"


def decode(token: str) -> dict[str, Any]:
    """The claims of a JWT, its signature checked against the issuer it names."""
    try:
        head, body, sig = token.strip().split(".")
        claims = json.loads(_unb64(body))
        raw = base64.b32decode(claims["iss"] + "=" * (-len(claims["iss"]) % 8))[1:-2]  # prefix byte .. crc16
        nacl.signing.VerifyKey(raw).verify(f"{head}.{body}".encode(), _unb64(sig))
    except (ValueError, KeyError, TypeError, nkeys.NkeysError, nacl.exceptions.CryptoError) as exc:
        raise ValidationError(f"not a valid NATS JWT: {exc}") from None
    return claims


def creds_text(jwt: str, seed: str) -> str:
    """A ``.creds`` file, as ``nsc`` writes them and every NATS client reads them."""
    return (
        "-----BEGIN NATS USER JWT-----\n"
        f"{jwt}\n"
        "------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{seed}\n"
        "------END USER NKEY SEED------\n\n"
        "*************************************************************\n"
    )


@dataclass(frozen=True)
class Creds:
    jwt: str
    seed: str

    @property
    def claims(self) -> dict[str, Any]:
        return decode(self.jwt)

    @property
    def name(self) -> str:
        return str(self.claims.get("name", ""))

    @classmethod
    def parse(cls, text: str) -> Creds:
        """The JWT and seed of a creds file; a clear error for anything else."""
        jwt = seed = None
        lines = [line.strip() for line in text.splitlines()]
        for i, line in enumerate(lines[:-1]):
            if "BEGIN NATS USER JWT" in line:
                jwt = lines[i + 1]
            elif "BEGIN USER NKEY SEED" in line:
                seed = lines[i + 1]
        if not jwt or not seed or not seed.startswith("SU"):
            raise ValidationError("not a NATS credentials file (it needs a user JWT and a user nkey seed)")
        creds = cls(jwt, seed)
        if creds.claims.get("sub") != public_key(seed):
            raise ValidationError("the credentials file's seed does not belong to its JWT")
        return creds


def user_permissions(perms: Permissions) -> dict[str, Any]:
    return {
        "pub": {"allow": list(perms.publish)},
        "sub": {"allow": list(perms.subscribe)},
        "subs": UNLIMITED,
        "data": UNLIMITED,
        "payload": UNLIMITED,
    }


def _limits(jetstream: bool) -> dict[str, Any]:
    limits: dict[str, Any] = {
        "subs": UNLIMITED, "data": UNLIMITED, "payload": UNLIMITED, "imports": UNLIMITED,
        "exports": UNLIMITED, "wildcards": True, "conn": UNLIMITED, "leaf": UNLIMITED,
    }  # fmt: skip
    if jetstream:
        limits.update(mem_storage=UNLIMITED, disk_storage=UNLIMITED, streams=UNLIMITED, consumer=UNLIMITED)
    return limits


class Keystore:
    """The operator's keys and what was issued with them (a folder; see the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()

    # --- the folder ----------------------------------------------------------------------------------------
    @classmethod
    def create(cls, root: str | Path, operator: str = "cadre") -> Keystore:
        """A new operator, system account and cadre account; refuses a folder that already holds keys."""
        store = cls(root)
        if (store.root / "operator.nk").exists():
            raise ConflictError(f"{store.root} already holds cadre's bus keys: use it, or pick another folder")
        store.root.mkdir(parents=True, exist_ok=True)
        store.root.chmod(0o700)
        for kind, name in (("operator", "operator"), ("account", "system"), ("account", "account"),
                           ("account", "run-signing")):  # fmt: skip
            store._write(f"{name}.nk", new_seed(kind))
        store._write("meta.json", json.dumps({"operator": operator}))
        store._write("users.json", json.dumps({"users": {}, "revoked": {}}))
        return store

    @classmethod
    def open(cls, root: str | Path) -> Keystore:
        store = cls(root)
        if not (store.root / "operator.nk").exists():
            raise NotFoundError(
                f"{store.root} holds no cadre bus keys: create them with `cadre admin init --keys {store.root}`"
            )
        return store

    def _write(self, name: str, text: str) -> None:
        path = self.root / name
        tmp = path.with_suffix(path.suffix + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)  # never half-written, even if killed

    def _seed(self, name: str) -> str:
        return (self.root / f"{name}.nk").read_text(encoding="utf-8").strip()

    def _issued(self) -> dict[str, Any]:
        return json.loads((self.root / "users.json").read_text(encoding="utf-8"))

    def users(self) -> dict[str, dict[str, Any]]:
        """Every user issued: name -> role, public key, issued_at and (once revoked) revoked_at."""
        return dict(self._issued().get("users", {}))

    def names(self) -> list[str]:
        return sorted(self.users())

    # --- the trust chain -----------------------------------------------------------------------------------
    @property
    def operator_key(self) -> str:
        return public_key(self._seed("operator"))

    @property
    def account_key(self) -> str:
        return public_key(self._seed("account"))

    @property
    def run_signing_key(self) -> str:
        return public_key(self._seed("run-signing"))

    def run_signing_seed(self) -> str:
        """The account signing key the submitter signs run credentials with (CADRE_RUN_SIGNING_SEED): it can
        make users of the cadre account, so it is a secret of the submitter alone."""
        return self._seed("run-signing")

    @property
    def system_key(self) -> str:
        return public_key(self._seed("system"))

    def operator_jwt(self) -> str:
        name = json.loads((self.root / "meta.json").read_text(encoding="utf-8"))["operator"]
        return encode("operator", name, self.operator_key, self._seed("operator"), {"system_account": self.system_key})

    def account_jwt(self) -> str:
        """The cadre account, signed now, with every revoked user key in it."""
        revocations = self._issued().get("revoked", {})
        nats = {
            "limits": _limits(jetstream=True),
            "default_permissions": {"pub": {}, "sub": {}},
            "signing_keys": [self.run_signing_key],
        }
        if revocations:
            nats["revocations"] = revocations
        return encode("account", ACCOUNT, self.account_key, self._seed("operator"), nats)

    def system_account_jwt(self) -> str:
        nats = {"limits": _limits(jetstream=False), "default_permissions": {"pub": {}, "sub": {}}}
        return encode("account", SYSTEM_ACCOUNT, self.system_key, self._seed("operator"), nats)

    def server_config(self, resolver_dir: str) -> list[str]:
        """The lines of a nats-server config that trust this operator (in place of an ``authorization`` block).

        The full resolver keeps the newest account JWT it was sent on disk, so a pushed revocation outlives a
        restart; the preload seeds a server that has never heard of the accounts."""
        q = json.dumps
        return [
            f"operator: {q(self.operator_jwt())}",
            f"system_account: {q(self.system_key)}",
            f'resolver: {{ type: full, dir: {q(resolver_dir)}, allow_delete: false, interval: "2m" }}',
            "resolver_preload: {",
            f"  {q(self.account_key)}: {q(self.account_jwt())}",
            f"  {q(self.system_key)}: {q(self.system_account_jwt())}",
            "}",
        ]

    # --- users ---------------------------------------------------------------------------------------------
    def issue(self, name: str, role: str, perms: Permissions, rotate: bool = False) -> str:
        """A creds file for a new user ``name`` (a fresh key); ``rotate`` revokes the key it had before.

        With ``rotate`` the account JWT changes: push it (:func:`shared.trust.push_account`)."""
        if not name or any(c.isspace() or c in "\"'" for c in name):
            raise ValidationError(f"user name {name!r} must be one word")
        issued = self._issued()
        users, revoked = issued.setdefault("users", {}), issued.setdefault("revoked", {})
        had = users.get(name)
        now = int(time.time())
        if had is not None and had.get("revoked_at") is None:
            if not rotate:
                when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(had["issued_at"]))
                raise ConflictError(
                    f"{name!r} already has bus credentials (issued {when} UTC): pass --rotate to issue new ones "
                    f"and revoke those, or `cadre admin revoke {name}` first"
                )
            revoked[had["public_key"]] = now
        seed = new_seed("user")
        jwt = encode("user", name, public_key(seed), self._seed("account"), user_permissions(perms))
        users[name] = {"role": role, "public_key": public_key(seed), "issued_at": now, "revoked_at": None}
        self._write("users.json", json.dumps(issued, indent=1, sort_keys=True))
        return creds_text(jwt, seed)

    def revoke(self, name: str) -> str:
        """Revoke ``name``'s key; returns the account JWT to push to the servers."""
        issued = self._issued()
        users = issued.setdefault("users", {})
        if name not in users:
            raise NotFoundError(f"no bus user {name!r} was issued here; issued: {', '.join(sorted(users)) or 'none'}")
        now = int(time.time())
        users[name]["revoked_at"] = now
        issued.setdefault("revoked", {})[users[name]["public_key"]] = now
        self._write("users.json", json.dumps(issued, indent=1, sort_keys=True))
        return self.account_jwt()

    def system_creds(self, valid_for: int = 300) -> str:
        """A short-lived system-account user that may only push account updates (issued per use, never stored)."""
        seed = new_seed("user")
        perms = Permissions(publish=["$SYS.REQ.CLAIMS.UPDATE", "$SYS.REQ.ACCOUNT.*.CLAIMS.UPDATE"],
                            subscribe=["_INBOX.>"])  # fmt: skip
        jwt = encode("user", "cadre-admin", public_key(seed), self._seed("system"), user_permissions(perms),
                     expires=int(time.time()) + valid_for)  # fmt: skip
        return creds_text(jwt, seed)


def run_creds(signing_seed: str, account_key: str, run_id: str, node_id: str, perms: Permissions) -> str:
    """Credentials for one run on one node, signed with the account's run-signing key (a fresh user key)."""
    seed = new_seed("user")
    nats = {**user_permissions(perms), "issuer_account": account_key}
    jwt = encode("user", f"{node_id}/{run_id}", public_key(seed), signing_seed, nats)
    return creds_text(jwt, seed)
