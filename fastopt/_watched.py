"""Dicts that notice edits, so the step can cache what it derived from them.

The hot path of a step must not re-validate hyperparameters or re-read every
parameter's state from dicts on every call (microseconds per parameter). It
caches instead, and these classes tell it when a cache is stale: every change
made through a dict method calls ``_edited()`` first. (A change made by
calling ``dict.__setitem__`` on them directly is not noticed; don't.)
"""


class WatchedDict(dict):
    """A dict whose methods call ``self._edited()`` before every change."""

    __slots__ = ()

    def _edited(self):
        raise NotImplementedError

    def _adopt(self, value):
        """What is stored for ``value`` (subclasses may wrap it)."""
        return value

    def __setitem__(self, key, value):
        self._edited()
        dict.__setitem__(self, key, self._adopt(value))

    def __delitem__(self, key):
        self._edited()
        dict.__delitem__(self, key)

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default
        return dict.__getitem__(self, key)

    def update(self, *args, **kwargs):
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __ior__(self, other):
        self.update(other)
        return self

    def pop(self, *args):
        self._edited()
        return dict.pop(self, *args)

    def popitem(self):
        self._edited()
        return dict.popitem(self)

    def clear(self):
        self._edited()
        dict.clear(self)


class ParamGroup(WatchedDict):
    """A param group. Its hyperparameters are validated when the group is
    added and again after any edit (``group["lr"] = ...``), not on every step."""

    __slots__ = ("checked",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.checked = None  # what the optimizer derived from the group, until the next edit

    def _edited(self):
        self.checked = None

    def __reduce__(self):
        return (ParamGroup, (dict(self),))


class State(WatchedDict):
    """``opt.state``: parameter index -> ParamState, counting edits in ``version``.

    Any dict stored in it becomes a ParamState reporting to it, so an edit of
    any parameter's state - replacing a buffer, changing a step - changes
    ``version`` and makes the next step re-read and re-check the state.
    """

    __slots__ = ("version",)

    def __init__(self, entries=()):
        super().__init__()
        self.version = 0
        for key, value in dict(entries).items():
            dict.__setitem__(self, key, self._adopt(value))

    def _edited(self):
        self.version += 1

    def _adopt(self, value):
        if isinstance(value, dict) and not (isinstance(value, ParamState) and value.owner is self):
            return ParamState(self, value)
        return value  # anything else is refused by the next step's checks

    def __reduce__(self):
        return (State, (dict(self),))


class ParamState(WatchedDict):
    """One parameter's state (``"step"`` and buffers); edits bump its owner's version."""

    __slots__ = ("owner",)

    def __init__(self, owner=None, entries=()):
        super().__init__(entries)
        self.owner = owner

    def _edited(self):
        if self.owner is not None:
            self.owner.version += 1

    def __reduce__(self):
        return (ParamState, (None, dict(self)))
