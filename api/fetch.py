"""Fetch an input image from a URL without letting the URL reach places it must not.

Defences, in order:

* :func:`broker.urlpolicy.check_url` on the URL and on every redirect hop
  (redirects are followed by hand, at most :data:`MAX_REDIRECTS`);
* the connection itself goes through :class:`GuardedBackend`, which resolves the
  host, applies the same address policy to every address, and connects to a
  checked address; so a DNS answer that changes between the check and the
  connect (DNS rebinding) cannot reach a private or metadata address;
* environment proxies are ignored; the body is streamed with a byte cap; the
  whole fetch (all hops) has one deadline, ``url_fetch_timeout_s``.
"""

from __future__ import annotations

import logging
import typing

import anyio
import httpcore
import httpx

from api.errors import ApiError
from api.settings import ApiSettings
from broker.netfailure import describe_network_failure
from broker.schema import ErrorCode
from broker.urlpolicy import UrlNotAllowed, check_url, is_allowed_address, system_resolver

logger = logging.getLogger("editfarm.api")

MAX_REDIRECTS = 3
_REDIRECTS = {301, 302, 303, 307, 308}
_FETCH_ERRORS = (httpx.HTTPError, httpx.InvalidURL, httpcore.NetworkError, httpcore.TimeoutException, httpcore.ProtocolError)


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore network backend that only connects to addresses the URL policy allows."""

    def __init__(self, allow_private: bool) -> None:
        self.allow_private = allow_private
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """Resolve, check every address, connect to the first that answers. Raises UrlNotAllowed."""
        addresses = await anyio.to_thread.run_sync(system_resolver, host, port)
        if not addresses or not all(is_allowed_address(a, self.allow_private) for a in addresses):
            raise UrlNotAllowed(f"host {host!r} resolves to a non-public address")
        last: Exception | None = None
        for address in addresses:
            try:
                # TLS still verifies against the URL's host name: httpcore passes it as SNI separately
                return await self._inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise UrlNotAllowed("unix sockets are not allowed")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class GuardedTransport(httpx.AsyncBaseTransport):
    """An httpx transport over an httpcore pool that uses :class:`GuardedBackend`."""

    def __init__(self, allow_private: bool) -> None:
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=4,
            network_backend=GuardedBackend(allow_private),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.AsyncByteStream)
        response = await self._pool.handle_async_request(httpcore.Request(
            method=request.method,
            url=httpcore.URL(scheme=request.url.raw_scheme, host=request.url.raw_host,
                             port=request.url.port, target=request.url.raw_path),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        ))
        assert isinstance(response.stream, typing.AsyncIterable)
        return httpx.Response(status_code=response.status, headers=response.headers,
                              stream=_Stream(response.stream), extensions=response.extensions)

    async def aclose(self) -> None:
        await self._pool.aclose()


class _Stream(httpx.AsyncByteStream):
    def __init__(self, inner: typing.AsyncIterable[bytes]) -> None:
        self._inner = inner

    async def __aiter__(self) -> typing.AsyncIterator[bytes]:
        async for chunk in self._inner:
            yield chunk

    async def aclose(self) -> None:
        aclose = getattr(self._inner, "aclose", None)
        if aclose is not None:
            await aclose()


def check_url_policy(url: str, settings: ApiSettings, param: str) -> None:
    """Apply the URL policy of ``settings`` (blocking: resolves DNS; call in a thread).

    Raises ApiError 422 url_not_allowed naming ``param``.
    """
    try:
        check_url(url, allow_http=settings.allow_http_urls, allow_private=settings.allow_private_urls)
    except UrlNotAllowed as exc:
        raise ApiError(422, ErrorCode.URL_NOT_ALLOWED, f"{param} URL not allowed: {exc}", param=param) from None
    except ValueError:  # urlsplit: bad port, bad IPv6 literal
        raise ApiError(422, ErrorCode.URL_NOT_ALLOWED, f"{param} URL is malformed", param=param) from None


def _failed(message: str) -> ApiError:
    return ApiError(422, ErrorCode.IMAGE_FETCH_FAILED, message, param="image")


async def fetch_image_bytes(url: str, settings: ApiSettings) -> bytes:
    """GET ``url`` (following ≤ 3 checked redirects) and return the body.

    Raises ApiError 422 url_not_allowed (policy), 422 image_fetch_failed
    (network error, timeout after ``url_fetch_timeout_s`` s in all, non-200
    answer, too many redirects) or 413 payload_too_large (body over
    ``max_image_bytes``).
    """
    limit = settings.max_image_bytes
    try:
        with anyio.fail_after(settings.url_fetch_timeout_s):
            async with httpx.AsyncClient(
                transport=GuardedTransport(settings.allow_private_urls),
                timeout=settings.url_fetch_timeout_s, follow_redirects=False, trust_env=False,
                headers={"User-Agent": "editfarm-api/1", "Accept": "image/png,image/jpeg,image/webp"},
            ) as client:
                for _hop in range(MAX_REDIRECTS + 1):
                    await anyio.to_thread.run_sync(check_url_policy, url, settings, "image")
                    async with client.stream("GET", url) as response:
                        if response.status_code in _REDIRECTS and "location" in response.headers:
                            url = str(response.url.join(response.headers["location"]))
                            continue
                        if response.status_code != 200:
                            raise _failed(f"image URL answered HTTP {response.status_code}")
                        declared = response.headers.get("content-length", "")
                        if declared.isdigit() and int(declared) > limit:
                            raise ApiError(413, ErrorCode.PAYLOAD_TOO_LARGE,
                                           f"image is larger than {limit} bytes", param="image")
                        body = bytearray()
                        async for chunk in response.aiter_bytes():
                            body += chunk
                            if len(body) > limit:
                                raise ApiError(413, ErrorCode.PAYLOAD_TOO_LARGE,
                                               f"image is larger than {limit} bytes", param="image")
                        return bytes(body)
                raise _failed(f"image URL redirected more than {MAX_REDIRECTS} times")
    except UrlNotAllowed as exc:  # from GuardedBackend at connect time
        raise ApiError(422, ErrorCode.URL_NOT_ALLOWED, f"image URL not allowed: {exc}", param="image") from None
    except TimeoutError:
        raise _failed(f"image URL did not answer within {settings.url_fetch_timeout_s} s") from None
    except _FETCH_ERRORS as exc:
        # the tenant gets a code and a sentence to act on; the exception's text (library and OS
        # detail) stays in the log
        code, sentence = describe_network_failure(exc)
        logger.info("image fetch failed: %s: %s", type(exc).__name__, exc)
        raise _failed(f"could not fetch the image URL ({code}: {sentence})") from None
