"""Credentials in locations. A location is printed in error lines and stored in configs, manifests,
checkpoints and W&B files, so it must never carry a credential: `credentials_in` says why one does
and what to use instead (~/.netrc for an HTTP login, the AWS variables for S3), and `redact` hides
any that would still reach an error line. (Its own module, importing nothing of the package: the
config, the commands and the store all use it.)"""

import re
import urllib.parse

# Query parameters that carry a credential: presigned URLs (S3's X-Amz-*, Google's X-Goog-*, Azure's
# sig) and tokens, keys and passwords by their usual names.
SECRET_PARAM = re.compile(
    r"(?i)x-(amz|goog)-(signature|credential|security-token)|sig|signature|auth|authorization|"
    r"((api|access|private|secret)[_-]?)?key|.*(token|secret|passw|credential).*"
)
# A URL within a line or a setting, up to a space, a quote, a comma or a colon that ends it
# ("http://host/x.tar: cannot be read").
URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\",]*?(?=:?(?:[\s'\",]|$))")
NETRC_FIX = "put the login in ~/.netrc (machine HOST login USER password PASSWORD), which is read for http(s)://"
AWS_FIX = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment"


def credentials_in(text: str) -> str | None:
    """Why a location (or a setting, or a command-line item naming locations) must not be used as
    it is: it carries a credential, which would be printed and stored with it; and the standard way
    to give that credential instead. None when it carries none."""
    for url in URL.findall(text):
        try:
            parts = urllib.parse.urlsplit(url)
        except ValueError:  # a host like [::1 that is no URL: nothing can be read from it either
            continue
        fix = AWS_FIX if parts.scheme.lower() == "s3" else NETRC_FIX
        if "@" in parts.netloc:
            return f"a user name or password in a URL would be printed and stored with it; take it out and {fix}"
        params = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        secret = [name for name, _ in params if SECRET_PARAM.fullmatch(name)]
        if any(name.lower().startswith("x-amz-") for name in secret):
            return (
                f"a presigned URL's credentials would be printed and stored with it; give s3://BUCKET/KEY and {AWS_FIX}"
            )
        if secret:
            return f"a {secret[0]}= in a URL would be printed and stored with it; take it out and {fix}"
    return None


def redact(text: str) -> str:
    """`text` with the credentials of every URL in it replaced by ***: the whole user name and
    password, and the value of each query parameter that carries one."""

    def hide(found: re.Match) -> str:
        url = re.sub(r"^([^:]+://)[^/?#]*@", r"\1***@", found.group())
        head, mark, query = url.partition("?")
        if not mark:
            return url
        params = [p.partition("=") for p in query.split("&")]
        return (
            head
            + mark
            + "&".join(
                f"{name}{eq}***" if eq and SECRET_PARAM.fullmatch(urllib.parse.unquote(name)) else f"{name}{eq}{value}"
                for name, eq, value in params
            )
        )

    return URL.sub(hide, text)
