"""Hide credentials that appear in command lines before they leave the agent.

Alerts copy `process.command_line` so an analyst can see what ran, but the command lines
of metadata callers are exactly where credentials live: `curl -H "X-aws-ec2-metadata-token:
AQAE..."`, bearer tokens, signed URLs, access keys. Each pattern keeps the name of the
secret (so the analyst still sees *that* a token was sent) and replaces only its value.

Headers that look like secrets but are not (`X-aws-ec2-metadata-token-ttl-seconds`,
`Metadata-Flavor: Google`, `Metadata: true`) are left alone: they tell the analyst which
metadata protocol the caller spoke.
"""

from __future__ import annotations

import re

MASK = "[REDACTED]"

# A header or option value ends at whitespace or at the quote that closed it; `\S` alone
# would swallow a closing quote of `-H 'Authorization: Bearer x'`.
_VALUE = r"[^\s'\"]+"

_PATTERNS: tuple[re.Pattern[str], ...] = (
    # IMDSv2 session token header. The negative look-ahead keeps the TTL request header,
    # whose value is a number of seconds, not a secret.
    re.compile(r"(?i)(x-aws-ec2-metadata-token(?!-ttl-seconds)\s*[:=]\s*)" + _VALUE),
    # Authorization headers of any scheme (`Bearer ya29...` on GCP, `Basic`, `token`):
    # the scheme stays visible, the credential word after it goes.
    re.compile(r"(?i)(authorization\s*[:=]\s*(?:(?:bearer|basic|token|negotiate)\s+)?)" + _VALUE),
    # SigV4 headers (`AWS4-HMAC-SHA256 Credential=..., Signature=...`) and pre-signed URLs.
    re.compile(r"(?i)(\b(?:x-amz-)?(?:signature|credential)=)[^\s&,'\"]+"),
    # STS session tokens travel as a header or as a pre-signed URL query parameter.
    re.compile(r"(?i)(x-amz-security-token\s*[:=]\s*)[^\s&'\"]+"),
    # AWS CLI / SDK style assignments: aws_secret_access_key=..., AWS_SESSION_TOKEN=...
    re.compile(r"(?i)((?:aws_)?(?:secret_access_key|session_token|security_token)"
               r"[\"']?\s*[:=]\s*[\"']?)" + _VALUE),
    # Options: --token=x, --token x, --password=x, --secret x, --api-key x, --client-secret x
    re.compile(r"(?i)(--?(?:[\w-]*-)?(?:token|password|passwd|secret|api-?key|access-?key)"
               r"(?:=|\s+))(?!-)" + _VALUE),
    # Query parameters and key=value pairs: ?token=x&..., access_token=x, id_token=x
    re.compile(r"(?i)((?:^|[?&\s;])(?:[\w-]*_)?(?:token|password|secret|api_?key|sig)=)"
               r"[^\s&'\"]+"),
)

# AWS access key ids carry no key=value prefix in many commands (`aws configure set
# aws_access_key_id AKIA...`); the id is not the secret key, but it identifies a principal
# and is worth hiding. AKIA = long-term key, ASIA = temporary STS key.
_ACCESS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AIDA|AROA)[A-Z0-9]{16}\b")
# `aws configure set aws_secret_access_key VALUE` passes the secret as a positional word.
_POSITIONAL_SECRET = re.compile(
    r"(?i)(\b(?:aws_)?(?:secret_access_key|session_token)\s+)(?![=:])" + _VALUE)


def redact(text: str) -> str:
    """Return `text` with every credential value replaced by `[REDACTED]`."""
    if not text:
        return text
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + MASK, text)
    text = _POSITIONAL_SECRET.sub(lambda m: m.group(1) + MASK, text)
    return _ACCESS_KEY_ID.sub(MASK, text)
