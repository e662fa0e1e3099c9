"""NTLM credentials held as hashes only, and the ways a user can hand them to us.

A password is turned into its LM and NT hashes as soon as it is read and then dropped: the
hashes are all NTLM needs, and nothing that can be printed (repr, str, logs) shows them. Only
when Kerberos tickets are to be obtained with the password (ntlm_kerberos_realm) is the password
itself kept, in memory, because the KDC needs it (or a key derived with the realm's salt).
"""

from __future__ import annotations

import binascii
import functools
import os
import re
import stat
import unicodedata
from dataclasses import dataclass, field

from .keychain import KeychainError
from .keychain import read_password as read_keychain_password
from .spnego_internals import lmowfv1, ntowfv1
from .userfile import FileRefused, decode_text, read_regular_file


class CredentialError(ValueError):
    """A credential option is missing, malformed or unsafe; the message says which."""


@dataclass(frozen=True)
class Credentials:
    """One NTLM identity. `lm_hash`/`nt_hash` are the standard 16-byte LMOWFv1/NTOWFv1 values."""

    user: str
    domain: str
    workstation: str
    nt_hash: bytes = field(repr=False)
    lm_hash: bytes = field(repr=False, default=b"\x00" * 16)
    kerberos_password: str | None = field(repr=False, default=None, compare=False)
    winbind: bool = False  # NTLM by winbind's ntlm_auth with its cached credentials (no secret)

    @property
    def has_ntlm_secret(self) -> bool:
        """False for a Kerberos-only identity (a ticket cache or keytab, no password)."""
        return bool(self.nt_hash)

    @property
    def can_ntlm(self) -> bool:
        """NTLM can be spoken as this identity: with its secret, or by winbind."""
        return self.has_ntlm_secret or self.winbind

    @property
    def principal(self) -> str:
        """DOMAIN\\user: the name logs show, and the user name pyspnego splits (no secret)."""
        return f"{self.domain}\\{self.user}" if self.domain else self.user

    def spnego_secret(self) -> str:
        """The `LM:NT` hex form pyspnego accepts in place of a password."""
        return f"{self.lm_hash.hex()}:{self.nt_hash.hex()}"

    def __str__(self) -> str:
        return self.principal


def hashes_from_password(password: str) -> tuple[bytes, bytes]:
    """(LM, NT) hashes of a password, computed with pyspnego's NTLM crypto."""
    return lmowfv1(password), ntowfv1(password)


HEX32 = re.compile(r"[0-9a-fA-F]{32}")


def parse_hex_hash(value: str, what: str) -> bytes:
    """A 16-byte hash given as 32 hex digits (spaces and case ignored)."""
    cleaned = "".join(value.split())
    if len(cleaned) != 32:
        raise CredentialError(f"{what} must be 32 hex digits, got {len(cleaned)} characters")
    if not HEX32.fullmatch(cleaned):
        raise CredentialError(f"{what} must be 32 hex digits (0-9, a-f), it has other characters")
    return binascii.unhexlify(cleaned)


def invert(hash_bytes: bytes) -> bytes:
    """cntlm prints and expects every hash byte XOR 0xFF; this converts either way."""
    return bytes(b ^ 0xFF for b in hash_bytes)


def parse_standard_hashes(value: str) -> tuple[bytes, bytes]:
    """`NT` or `LM:NT` in the standard (impacket/pyspnego) hex form."""
    parts = value.strip().split(":")
    if len(parts) == 1:
        return b"\x00" * 16, parse_hex_hash(parts[0], "ntlm_hashes (NT)")
    if len(parts) == 2:
        return (
            parse_hex_hash(parts[0], "ntlm_hashes (LM part)"),
            parse_hex_hash(parts[1], "ntlm_hashes (NT part)"),
        )
    raise CredentialError("ntlm_hashes must be NT or LM:NT, 32 hex digits each")


def require_private(st: os.stat_result, label: str, path: str) -> None:
    """CredentialError unless the file `st` describes is its owner's alone (POSIX modes)."""
    if os.name != "posix":
        return  # Windows reports no owner/group/other bits (ACLs decide): nothing to check
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CredentialError(
            f"{label} is readable by others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
        )
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise CredentialError(f"{label} is not owned by the current user")


def read_secret_text(path: str, what: str = "ntlm_password_file") -> str:
    """The text of a regular file that only its owner can read (like ~/.ssh keys).

    Never blocks (a FIFO, directory or device is refused before it is read) and never guesses
    an encoding; `what` names the option in the messages."""
    label = f"{what} {path}"

    def private(st: os.stat_result) -> None:
        require_private(st, label, path)

    try:
        return decode_text(read_regular_file(path, what, check=private), label)
    except FileRefused as e:
        raise CredentialError(str(e)) from None


def read_secret_file(path: str, what: str = "ntlm_password_file") -> str:
    """The password on the first line of a secret file (see read_secret_text)."""
    lines = read_secret_text(path, what).splitlines()
    if not lines:
        raise CredentialError(f"{what} {path} is empty: put the password on its first line")
    if not lines[0]:
        raise CredentialError(f"{what} {path} has an empty first line: put the password there")
    return lines[0]


def principal_of(user: str, domain: str) -> str:
    """`DOMAIN\\user` (or `user`) from the user and domain options, as Credentials.principal."""
    name, dom = split_principal(user, domain)
    return f"{dom}\\{name}" if dom else name


def split_principal(user: str, domain: str) -> tuple[str, str]:
    """Accept `DOMAIN\\user` or `user@domain` in the user field; an explicit domain wins."""
    if "\\" in user:
        dom, _, name = user.partition("\\")
        return name, domain or dom
    if "@" in user and not domain:
        name, _, dom = user.partition("@")
        return name, dom
    return user, domain


# Caps on names clients send, with room to spare over what a domain accepts (sAMAccountName
# at most 20 characters, a UPN at most 1024, a DNS domain name at most 253 bytes): longer
# ones cannot be a logon, and every map keyed by users stays small.
MAX_USER_BYTES = 256
MAX_DOMAIN_BYTES = 255


def check_client_names(name: str, domain: str) -> None:
    """Refuse a user name and domain (as split_principal returns them) that cannot be a
    logon, before anything is sent to the parent."""
    if not name:
        raise CredentialError("the user name is empty; send DOMAIN\\user (or user@domain) and "
                              "the password")
    for what, value, cap in (("user name", name, MAX_USER_BYTES),
                             ("domain", domain, MAX_DOMAIN_BYTES)):
        size = len(value.encode("utf-8", "surrogatepass"))
        if size > cap:
            raise CredentialError(f"the {what} is too long ({size} bytes; at most {cap})")


@functools.lru_cache(maxsize=256)  # asked per logon and per pooled request; names are short
def account_of(principal: str) -> str:
    """The account a logon counts against, as the lockout guard counts: the user name without
    any domain (`DOMAIN\\user`, `user@domain`), compared case-insensitively.

    The domain is left out on purpose: a domain controller takes a domain name it does not
    know for its own, so `CORP\\alice`, `corp\\ALICE`, `alice@corp.example` and `OTHER\\alice`
    can all be one account. Equal user names in different domains share a count (the guard
    errs towards stopping); a UPN whose prefix differs from the account name is not matched.
    Width and accents are ignored too (fullwidth letters, `alíce`): AD may take them for one
    account.
    """
    name = principal.rpartition("\\")[2]
    if "@" in name:
        name = name.partition("@")[0]
    decomposed = unicodedata.normalize("NFKD", name)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


@dataclass(frozen=True)
class SecretSources:
    """The credential options as given; exactly one source of the secret may be set."""

    password: str = ""
    password_env: str = ""
    password_file: str = ""
    pass_nt: str = ""
    pass_lm: str = ""
    hashes: str = ""
    keyring_entry: str = ""  # DOMAIN\\user to read from the OS keychain (ntlm_password_keyring)

    def given(self) -> list[str]:
        names = {
            "ntlm_password": self.password,
            "ntlm_password_env": self.password_env,
            "ntlm_password_file": self.password_file,
            "ntlm_pass_nt": self.pass_nt,
            "ntlm_hashes": self.hashes,
            "ntlm_password_keyring": self.keyring_entry,
        }
        return [name for name, value in names.items() if value]

    def _password_text(self) -> str | None:
        """The password itself when a password option is the source (not a hash)."""
        if self.password:
            return self.password
        if self.password_env:
            value = os.environ.get(self.password_env)
            if not value:
                raise CredentialError(
                    f"ntlm_password_env: environment variable {self.password_env} is not set"
                )
            return value
        if self.password_file:
            return read_secret_file(self.password_file)
        if self.keyring_entry:
            try:
                return read_keychain_password(self.keyring_entry)
            except KeychainError as e:
                raise CredentialError(f"ntlm_password_keyring: {e}") from None
        return None

    def resolve(self) -> tuple[bytes, bytes, str | None]:
        """(LM, NT) hashes from whichever single source is set, and the password itself when
        that source is a password (read once: a file or variable may change meanwhile)."""
        given = self.given()
        if self.pass_lm and not self.pass_nt:
            raise CredentialError("ntlm_pass_lm needs ntlm_pass_nt as well")
        if not given:
            raise CredentialError(
                "no NTLM secret: set one of ntlm_password_file, ntlm_password_keyring, "
                "ntlm_password_env, ntlm_pass_nt (as printed by `cntlm -H` / `mitm-ntlm hash`), "
                "ntlm_hashes or ntlm_password"
            )
        if len(given) > 1:
            raise CredentialError(f"set only one NTLM secret option, got: {', '.join(given)}")
        password = self._password_text()
        if password is not None:
            return (*hashes_from_password(password), password)
        if self.pass_nt:
            nt = invert(parse_hex_hash(self.pass_nt, "ntlm_pass_nt"))
            lm = invert(parse_hex_hash(self.pass_lm, "ntlm_pass_lm")) if self.pass_lm else None
            return lm or b"\x00" * 16, nt, None
        return (*parse_standard_hashes(self.hashes), None)


def build_credentials(
    user: str, domain: str, workstation: str, sources: SecretSources,
    keep_password: bool = False,
) -> Credentials:
    """Validate the options and derive the hashes; the password is kept only if asked for."""
    if not user:
        raise CredentialError("ntlm_username is not set")
    name, dom = split_principal(user, domain)
    lm, nt, password = sources.resolve()
    return Credentials(
        user=name, domain=dom, workstation=workstation.upper(), nt_hash=nt, lm_hash=lm,
        kerberos_password=password if keep_password else None,
    )


def kerberos_only(principal: str, workstation: str) -> Credentials:
    """An identity known only by its Kerberos principal (ticket cache or keytab, no secret)."""
    return Credentials(user=principal, domain="", workstation=workstation.upper(), nt_hash=b"",
                       lm_hash=b"")
