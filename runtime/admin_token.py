"""The admin bearer token, following its file: a re-created Secret is rewritten in place by the kubelet, and the
operator must not be locked out until the pod restarts.

Each admin request stats the file (cheap) and re-reads it only when its identity, size or mtime changed. A file
that is unreadable or empty at that moment keeps the previous token (a half-done rewrite must not disable the
admin API) and says so once per change. The token itself is never logged."""
import logging
import os

log = logging.getLogger("semipd.admin")


class AdminToken:
    def __init__(self, token: str | None, path: str | None = None):
        self._token = token
        self._path = path
        self._stamp = self._stat() if path else None

    def current(self) -> str | None:
        if self._path is None:
            return self._token
        stamp = self._stat()
        if stamp == self._stamp:
            return self._token
        self._stamp = stamp
        if stamp is None:
            log.warning("admin token file %s cannot be read now; keeping the previous token", self._path)
            return self._token
        try:
            with open(self._path) as f:
                token = f.read().strip()
        except OSError as exc:
            log.warning("admin token file %s cannot be read now (%s); keeping the previous token", self._path,
                        exc.strerror)
            return self._token
        if not token:
            log.warning("admin token file %s is empty now; keeping the previous token", self._path)
            return self._token
        if token != self._token:
            log.info("admin token file %s changed: using the new token", self._path)
            self._token = token
        return self._token

    def _stat(self):
        # follows the kubelet's symlinks (token -> ..data/token), so a swapped data directory shows as a new inode
        try:
            st = os.stat(self._path)
        except OSError:
            return None
        return st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns
