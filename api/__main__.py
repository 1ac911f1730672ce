"""``python -m api``: serve the API with uvicorn on EDITFARM_HOST:EDITFARM_PORT."""

from __future__ import annotations

import uvicorn

from api.settings import ApiSettings


def main() -> None:
    settings = ApiSettings()
    uvicorn.run("api.app:create_app", factory=True, host=settings.host, port=settings.port,
                proxy_headers=True)


if __name__ == "__main__":
    main()
