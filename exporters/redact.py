"""Hide credentials in the text fields an alert copies, before they leave the agent.

Alerts copy `process.command_line` and `process.args` so an analyst can see what ran, but
the command lines of metadata callers are exactly where credentials live: `curl -H
"X-aws-ec2-metadata-token: AQAE..."`, bearer tokens, signed URLs, access keys, the IMDS
credential JSON a script echoes, a password after `-u user:` or `-p`. Each pattern keeps the
name of the secret (so the analyst still sees *that* a token was sent) and replaces only its
value. Over-redaction is the accepted failure mode: `ssh -p2222` loses its port.

Headers that look like secrets but are not (`X-aws-ec2-metadata-token-ttl-seconds`,
`Metadata-Flavor: Google`, `Metadata: true`) are left alone: they tell the analyst which
metadata protocol the caller spoke. A value that is a command substitution (`TOKEN=$(curl
...)`) is not a secret and stays, so the command that fetched the token stays readable.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MASK = "[REDACTED]"

# A value ends at whitespace or at the quote that closed it; `\S` alone would swallow a
# closing quote of `-H 'Authorization: Bearer x'`. It may open with a quote of its own
# (`--token 'x'`, `{'Authorization': 'x'}`), and is never a command substitution.
_VALUE = r"(?!\$\()[^\s'\"]+"
_Q = r"['\"]?"
# Names of secrets inside option names, variable names and JSON keys.
_SECRET_WORD = (r"(?:token|password|passwd|passphrase|secret|api-?_?key|access-?_?key|"
                r"private-?_?key|credentials?|auth)")

_PATTERNS: tuple[re.Pattern[str], ...] = (
    # IMDSv2 session token header, also as a dict entry ('X-aws-ec2-metadata-token': 'x').
    # The negative look-ahead keeps the TTL request header, whose value is seconds.
    re.compile(r"(?i)(x-aws-ec2-metadata-token(?!-ttl-seconds)" + _Q + r"\s*[:=]\s*" + _Q + ")"
               + _VALUE),
    # Authorization headers of any scheme (`Bearer ya29...` on GCP, `Basic`, `token`):
    # the scheme stays visible, the credential word after it goes.
    re.compile(r"(?i)(authorization" + _Q + r"\s*[:=]\s*" + _Q
               + r"(?:(?:bearer|basic|token|negotiate)\s+)?)" + _VALUE),
    # SigV4 headers (`AWS4-HMAC-SHA256 Credential=..., Signature=...`) and pre-signed URLs.
    re.compile(r"(?i)(\b(?:x-amz-)?(?:signature|credential)=)[^\s&,'\"]+"),
    # STS session tokens travel as a header or as a pre-signed URL query parameter.
    re.compile(r"(?i)(x-amz-security-token" + _Q + r"\s*[:=]\s*" + _Q + r")[^\s&'\"]+"),
    # JSON or dict entries whose key names a secret: the IMDS credential document
    # ("SecretAccessKey", "Token", "AccessKeyId") echoed or passed to a script.
    re.compile(r"(?i)(['\"][\w-]*(?:" + _SECRET_WORD + r"|AccessKeyId)(?![\w-]*ttl)[\w-]*['\"]"
               r"\s*:\s*['\"])[^'\"]+"),
    # AWS CLI / SDK style assignments: aws_secret_access_key=..., AWS_SESSION_TOKEN=...
    re.compile(r"(?i)((?:aws_)?(?:secret_access_key|session_token|security_token)"
               r"[\"']?\s*[:=]\s*[\"']?)" + _VALUE),
    # Options: --token=x, --token x, --password 'x', --client-secret x, --vault-token x
    re.compile(r"(?i)(--?(?:[\w-]*-)?(?:token|password|passwd|secret|api-?key|access-?key)"
               r"(?:=|\s+)" + _Q + r")(?!-)" + _VALUE),
    # Query parameters: ?token=x&..., access_token=x, id_token=x, X-Amz-Signature=x
    re.compile(r"(?i)((?:^|[?&\s;])(?:[\w-]*_)?(?:token|password|secret|api_?key|sig)=)"
               r"(?!\$\()[^\s&'\"]+"),
    # Shell assignments, also in a parent's shell: DB_PASSWORD=x ./run, export VAULT_TOKEN=x,
    # TOKEN=x (the secret word may be the whole name)
    re.compile(r"(?i)((?:^|[\s;&|(`'\"])(?:export\s+)?[a-z0-9_]*" + _SECRET_WORD
               + r"[a-z0-9_]*=" + _Q + ")" + _VALUE),
    # curl/wget basic auth: -u user:pw, --user=user:pw, --proxy-user user:pw
    re.compile(r"(?i)((?:^|\s)(?:-u\s*|--(?:proxy-)?user(?:=|\s+))" + _Q + r"[^\s:'\"]*:)"
               + _VALUE),
    # URL userinfo: https://user:pw@host/, and a long user alone, which is a token
    # (https://TOKEN@github.com/...)
    re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://[^\s/@:'\"]*:)[^\s/@'\"]+(?=@)"),
    re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://)[^\s/@:'\"]{20,}(?=@)"),
    # A password glued to its option: mysql -pSECRET
    re.compile(r"((?:^|\s)-p)(?![\s-])" + _VALUE),
)

# Secrets recognisable by their own shape, wherever they appear.
_SHAPED = re.compile(
    r"\b(?:"
    r"(?:AKIA|ASIA|AIDA|AROA)[A-Z0-9]{16}"          # AWS access key ids
    r"|hv[sbr]\.[A-Za-z0-9_-]{20,}"                  # Vault tokens (service, batch, recovery)
    r"|s\.[A-Za-z0-9]{24}"                           # Vault legacy service tokens
    r"|gh[pousr]_[A-Za-z0-9]{30,}"                   # GitHub tokens
    r"|github_pat_[A-Za-z0-9_]{22,}"                 # GitHub fine-grained tokens
    r"|glpat-[A-Za-z0-9_-]{20,}"                     # GitLab personal tokens
    r"|xox[abprs]-[A-Za-z0-9-]{10,}"                 # Slack tokens
    r"|AQA[A-Za-z0-9_+/-]{20,}={0,2}"                # IMDSv2 session tokens
    r"|eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"  # JWTs (header.payload.sig)
    r")"
    # AWS secret access keys: 40 characters of base64 with upper and lower case and a digit
    # or symbol, standing alone (a hex digest has no upper case, so it stays)
    r"|(?<![A-Za-z0-9/+])(?=[A-Za-z0-9/+]{0,39}[A-Z])(?=[A-Za-z0-9/+]{0,39}[a-z])"
    r"(?=[A-Za-z0-9/+]{0,39}[0-9/+])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"
)

# Any assignment where the shell takes it as one: at the start of a command (of the line,
# or inside a quoted string or after ; & | ( ` $( that starts one), after `env` and its
# options, `export`, `readonly`, `local`, `declare -x`; and the assignments that follow it
# (`X=1 TOKEN=secret ./run`). Its name says nothing (`TOKEN`, `T`, `K`): every value goes but
# a reference (`$T`, `$(...)`) and a few names that never hold a secret.
_ASSIGNMENTS = re.compile(
    r"(?:^|(?<=[;&|(`'\"])|(?<=\$\()|\b(?:env(?:\s+-[^\s=]*)*|export|readonly|local|"
    r"declare\s+-x)\s+)\s*"
    r"(?:[A-Za-z_][A-Za-z0-9_]*=(?:'[^']*'|\"[^\"]*\"|[^\s;&|'\"`)]*)(?:\s+|$|(?=[;&|'\"`)])))+")
_ONE_ASSIGNMENT = re.compile(
    r"([A-Za-z_][A-Za-z0-9_]*)=('[^']*'|\"[^\"]*\"|[^\s;&|'\"`)]*)")
_HARMLESS_NAMES = re.compile(
    r"(?:PATH|HOME|LANG|LANGUAGE|LC_[A-Z]+|TERM|TZ|USER|LOGNAME|SHELL|PWD|HOSTNAME|"
    r"DEBIAN_FRONTEND|PYTHON(?:PATH|UNBUFFERED|DONTWRITEBYTECODE)|NODE_ENV|"
    r"AWS_(?:DEFAULT_)?REGION|AWS_PROFILE|AWS_EC2_METADATA_DISABLED|VAULT_ADDR|KUBECONFIG)$")


def _mask_assignment(m: re.Match[str]) -> str:
    name, value = m.group(1), m.group(2)
    bare = value.strip("'\"")
    if not bare or bare.startswith("$") or _HARMLESS_NAMES.match(name) or MASK in bare:
        return m.group(0)
    return f"{name}={MASK}"


def _mask_assignments(m: re.Match[str]) -> str:
    return _ONE_ASSIGNMENT.sub(_mask_assignment, m.group(0))
# `aws configure set aws_secret_access_key VALUE` passes the secret as a positional word.
_POSITIONAL_SECRET = re.compile(
    r"(?i)(\b(?:aws_)?(?:secret_access_key|session_token)\s+)(?![=:])" + _VALUE)

# An argv element whose value is the next element: an option (`--token X`, `-u u:p`) or a
# secret header name split from its value (`"X-aws-ec2-metadata-token:" "X"`).
_SECRET_OPTION = re.compile(
    r"(?i)^(?:--?(?:[\w-]*-)?(?:token|password|passwd|secret|api-?key|access-?key|"
    r"client-?secret)|"
    r"['\"]?(?:x-aws-ec2-metadata-token|authorization|x-amz-security-token)['\"]?\s*[:=]?)$")
# `-u user:pw` / `--user user:pw`: the password part of the next element goes; `runuser
# -u nobody` or `sort -u` keep theirs.
_USER_OPTION = re.compile(r"^(?:-u|--user|--proxy-user)$")
_SCHEME = re.compile(r"(?i)^['\"]?(?:bearer|basic|token|negotiate)$")


def redact(text: str) -> str:
    """Return `text` with every credential value replaced by `[REDACTED]`."""
    if not text:
        return text
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + MASK, text)
    text = _POSITIONAL_SECRET.sub(lambda m: m.group(1) + MASK, text)
    text = _ASSIGNMENTS.sub(_mask_assignments, text)
    return _SHAPED.sub(MASK, text)


def redact_args(args: Iterable[object]) -> list[object]:
    """An argument vector redacted element by element, and an element masked whole when
    its neighbours name it a secret: after an option that takes one (`["vault", "--token",
    "X"]`), or when the patterns match across the element boundary (a header or dict entry
    split over two elements). A pattern over one element alone cannot see either."""
    out: list[object] = []
    window: list[str] = []  # up to two preceding elements, as written
    mask_next = user_next = False
    for arg in args:
        if not isinstance(arg, str):
            out.append(arg)
            window, mask_next, user_next = [], False, False
            continue
        if user_next and ":" in arg:
            out.append(arg.split(":", 1)[0] + ":" + MASK)
            user_next = False
        elif mask_next and _SCHEME.match(arg):
            out.append(arg)  # `Authorization:` `Bearer` `X`: the scheme stays, X goes
        elif mask_next:
            out.append(MASK)
            mask_next = False
        else:
            joined = " ".join([*window, arg])
            crossed = window and not redact(joined).endswith(" " + arg)
            out.append(MASK if crossed else redact(arg))
            mask_next = bool(_SECRET_OPTION.match(arg))
            user_next = bool(_USER_OPTION.match(arg))
        window = [*window[-1:], arg]
    return out
