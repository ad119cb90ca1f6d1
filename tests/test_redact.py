# Metadata addresses in this file are data (event fields, expected matches): nothing here
# connects to them. Real connections happen only inside a test's own network namespace
# (netns, tests/netns_fixtures.py).
"""Credentials in command lines never reach an alert; harmless protocol headers stay."""

import pytest

from exporters.redact import MASK, redact

SECRETS = [
    # (command line, the secret that must disappear)
    ('curl -H "X-aws-ec2-metadata-token: AQAEAHfK1x9z==" http://169.254.169.254/latest/meta-data/',
     "AQAEAHfK1x9z=="),
    ("curl -H X-aws-ec2-metadata-token:$TOKEN_VALUE_123 http://169.254.169.254/",
     "TOKEN_VALUE_123"),
    ("curl -H 'x-aws-ec2-metadata-token: abc.def-ghi' 169.254.169.254", "abc.def-ghi"),
    ('curl -H "Authorization: Bearer eyJhbGciOiJSUzI1NiJ9.payload.sig" https://api',
     "eyJhbGciOiJSUzI1NiJ9.payload.sig"),
    ("curl -H 'Authorization: Bearer ya29.a0AfH6SMB' https://storage.googleapis.com",
     "ya29.a0AfH6SMB"),
    ("wget --header=Authorization:dXNlcjpwYXNz http://x", "dXNlcjpwYXNz"),
    ("curl -H 'Authorization: Basic dXNlcjpwYXNz' http://x", "dXNlcjpwYXNz"),
    ("vault login --token=s.8Hq2kXyz", "s.8Hq2kXyz"),
    ("kubectl --token s.Y2hhbmdlbWU get pods", "s.Y2hhbmdlbWU"),
    ("curl 'http://svc/api?token=deadbeef42&x=1'", "deadbeef42"),
    ("curl http://svc/cb?access_token=zzTopSecret", "zzTopSecret"),
    ("aws configure set aws_access_key_id AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE"),
    ("env aws_secret_access_key=wJalrXUtnFEMI/K7MDENG/bPxRfiCY python app.py",
     "wJalrXUtnFEMI/K7MDENG/bPxRfiCY"),
    ("AWS_SECRET_ACCESS_KEY='wJalrXUtnFEMI' aws s3 ls", "wJalrXUtnFEMI"),
    ("aws configure set aws_secret_access_key wJalrXUtnFEMIK7MDENG", "wJalrXUtnFEMIK7MDENG"),
    ('curl -H "X-Amz-Security-Token: FwoGZXIvYXdzEJr//////////" https://s3', "FwoGZXIvYXdzEJr"),
    ("curl 'https://b.s3.amazonaws.com/k?X-Amz-Security-Token=IQoJb3JpZ2lu&X-Amz-Signature=abc123'",
     "IQoJb3JpZ2lu"),
    ("curl 'https://b.s3.amazonaws.com/k?X-Amz-Signature=abc123def&X-Amz-Date=1'", "abc123def"),
    ("mysql --password=hunter2 -h db", "hunter2"),
]


@pytest.mark.parametrize(("line", "secret"), SECRETS)
def test_secret_is_replaced(line: str, secret: str) -> None:
    out = redact(line)
    assert secret not in out
    assert MASK in out


@pytest.mark.parametrize("line", [
    'curl -X PUT -H "X-aws-ec2-metadata-token-ttl-seconds: 21600" http://169.254.169.254/latest/api/token',
    'curl -H "Metadata-Flavor: Google" http://metadata.google.internal/computeMetadata/v1/',
    'curl -H Metadata:true "http://169.254.169.254/metadata/instance?api-version=2021-02-01"',
    "/usr/bin/amazon-ssm-agent",
    "python3 -m http.server 8080",
    "",
])
def test_harmless_lines_are_unchanged(line: str) -> None:
    assert redact(line) == line


def test_header_name_and_rest_of_line_survive() -> None:
    line = ('curl -s -H "X-aws-ec2-metadata-token: AQAEAHfK" '
            "http://169.254.169.254/latest/meta-data/iam/security-credentials/")
    assert redact(line) == (
        'curl -s -H "X-aws-ec2-metadata-token: [REDACTED]" '
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/"
    )


def test_bearer_scheme_stays_visible() -> None:
    assert redact("Authorization: Bearer abc.def") == "Authorization: Bearer [REDACTED]"


def test_token_fetch_and_use_in_one_shell_line() -> None:
    line = ('TOKEN=$(curl -X PUT -H "X-aws-ec2-metadata-token-ttl-seconds: 60" '
            'http://169.254.169.254/latest/api/token) && curl -H "X-aws-ec2-metadata-token: '
            'AQAEAxyz" http://169.254.169.254/')
    out = redact(line)
    assert "AQAEAxyz" not in out
    assert "X-aws-ec2-metadata-token-ttl-seconds: 60" in out
