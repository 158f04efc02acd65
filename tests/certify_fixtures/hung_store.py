"""A backend whose reads never come back (a dead NFS mount, a stuck RPC): the seed's three methods."""

import threading

_never = threading.Event()


class HungStore:
    def __init__(self):
        self.pages = {}

    def get(self, key):
        _never.wait(600)
        return self.pages.get(key)

    def set(self, key, value):
        self.pages[key] = value.clone()
        return True

    def exists(self, key):
        return key in self.pages
