"""Where the console lives, and the headers every one of its pages is sent with: a strict
Content-Security-Policy (nothing is fetched from elsewhere), no framing, no caching."""

PREFIX = "/ui"
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # (no-referrer would make a form's Origin "null")
    "Cache-Control": "no-store",
}
