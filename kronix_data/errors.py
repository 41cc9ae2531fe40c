"""The errors kronix-data raises on purpose, under one base a caller can catch.

Each keeps the built-in type it had before there was a hierarchy, so an
existing ``except ValueError`` / ``except LookupError`` still catches it:

- :class:`InvalidInputError`: a value the queue refuses (a payload that is not
  JSON, a name with control characters, ``concurrency=0``); a ``ValueError``
  and a ``TypeError``, because a wrong type and a wrong value are both the
  caller's input, and both were raised before;
- :class:`NotFoundError`: no job or batch with that id, where the call cannot
  answer "none" (``driver.batch(id)``); a ``LookupError``;
- :class:`NotHeldError`: this worker no longer holds that attempt of the job (its
  lease expired and another worker took it, or it already finished), where the
  call has no ``False`` to return;
- :class:`DatabaseUnavailableError`: the database cannot be reached or dropped the
  connection; a SQLAlchemy ``OperationalError`` as before, with the driver's own
  error as ``orig``.  Workers ride it out; a notebook call raises it;
- :class:`WorkerCrash`: the process running a job (a process-pool slot) died under it, by a
  signal (a segfault, ``os.abort()``, the OOM killer) or an exit; the message names the signal;
- :class:`MissingDriverError`: the Python module that talks to the URL's database
  is not installed (``mysql://`` without PyMySQL); an ``ImportError``, as the bare
  ``ModuleNotFoundError`` it replaces, with the ``pip install`` that fixes it.
"""

from __future__ import annotations

from sqlalchemy import exc


class KronixError(Exception):
    """The base of every error kronix-data raises on purpose."""


class InvalidInputError(KronixError, ValueError, TypeError):
    """Input the queue refuses; the message names what is wrong, and nothing was written."""


class NotFoundError(KronixError, LookupError):
    """No job or batch has that id in this table."""


class NotHeldError(KronixError):
    """This worker no longer holds that attempt of the job, so it may not change it."""


class WorkerCrash(KronixError):
    """The process running a job died under it; recorded as ``WorkerCrash: killed by SIGABRT``."""


class DatabaseUnavailableError(KronixError, exc.OperationalError):
    """The database cannot be reached, or it dropped the connection mid-call."""

    @classmethod
    def from_error(cls, error: exc.DBAPIError) -> DatabaseUnavailableError:
        """The same error (message, statement, driver error) under this type."""
        unavailable = cls(error.statement, error.params, error.orig, hide_parameters=error.hide_parameters,
                          connection_invalidated=error.connection_invalidated, code=error.code)
        unavailable.with_traceback(error.__traceback__)
        return unavailable


class MissingDriverError(KronixError, ImportError):
    """The database driver a URL needs cannot be imported; the message says what to install.

    ``name`` is the module that is missing (as on any ``ImportError``),
    ``database`` the database it is for, and ``install`` the command that fixes
    it: None where kronix-data cannot name one (a driver of the URL's own choice,
    ``postgresql+psycopg2://``; a Python built without ``sqlite3``).
    """

    def __init__(self, message: str, *, name: str | None, database: str, install: str | None):
        super().__init__(message, name=name)
        self.database = database
        self.install = install

    def __reduce__(self):  # the keyword-only arguments survive pickling (to and from worker processes)
        return _rebuild_missing_driver_error, (self.msg, self.name, self.database, self.install)


def _rebuild_missing_driver_error(message: str, name: str | None, database: str,
                                  install: str | None) -> MissingDriverError:
    return MissingDriverError(message, name=name, database=database, install=install)
