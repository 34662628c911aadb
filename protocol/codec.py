"""The one msgpack codec: typed message structs, strict decoding, a size cap per message type.

Every message a peer can send is a ``Message`` subclass with a unique ``TYPE`` and a ``MAX_BYTES``
cap on its encoded body. Subclasses register themselves on definition, so ``decode_body(type,
data)`` can look up the class and decode strictly into it: unknown fields, missing fields, wrong
types and over-long values are all ``DecodeError``; an unknown type is ``UnknownMessageType``; a
body over its cap is ``TooLarge``, refused before any decoding.

Why msgspec rather than msgpack + hand-written checks: msgspec is msgpack on the wire, and it
decodes straight into a declared schema in C (types, lengths, ranges via ``Meta``), which is
exactly the strict typed decode this boundary needs, faster than plain ``msgpack.unpackb`` and
with no validation code of ours to get wrong.

>>> from protocol.membership import Goodbye
>>> decode_body("membership.goodbye", encode_body(Goodbye(reason="shutdown")))
Goodbye(reason='shutdown')
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, ClassVar, TypeVar

import msgspec

from protocol.errors import ConfigError, DecodeError, TooLarge, UnknownMessageType

KiB = 1024
MiB = 1024 * KiB

# Reusable field types with bounds, so every message states its limits the same way.
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Text = Annotated[str, msgspec.Meta(max_length=4096)]
Hash32 = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
PeerIdStr = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Multiaddr = Annotated[str, msgspec.Meta(min_length=1, max_length=512)]

_REGISTRY: dict[str, type[Message]] = {}
_DECODERS: dict[str, msgspec.msgpack.Decoder[Any]] = {}
_ENCODER = msgspec.msgpack.Encoder()

M = TypeVar("M", bound="Message")


class Message(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of every wire message. Subclasses set ``TYPE`` (``family.name``) and ``MAX_BYTES``."""

    TYPE: ClassVar[str] = ""
    MAX_BYTES: ClassVar[int] = 64 * KiB

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        assert cls.TYPE, f"{cls.__name__} must set TYPE"
        assert cls.TYPE not in _REGISTRY, f"message type {cls.TYPE!r} registered twice"
        _REGISTRY[cls.TYPE] = cls


def message_types() -> dict[str, type[Message]]:
    """Every registered message type, by ``TYPE``."""
    return dict(_REGISTRY)


def message_class(type_name: str) -> type[Message]:
    try:
        return _REGISTRY[type_name]
    except KeyError:
        raise UnknownMessageType(f"unknown message type {type_name[:64]!r}") from None


def max_body_bytes() -> int:
    """The largest cap of any registered type: no valid frame's body is bigger."""
    return max(cls.MAX_BYTES for cls in _REGISTRY.values())


def encode_body(msg: Message) -> bytes:
    data = _ENCODER.encode(msg)
    if len(data) > msg.MAX_BYTES:
        raise TooLarge(f"{msg.TYPE} encodes to {len(data)} bytes, over its cap of {msg.MAX_BYTES}")
    return data


def decode_body(type_name: str, data: bytes) -> Message:
    """Decode a body strictly as the message class registered for ``type_name``."""
    cls = message_class(type_name)
    if len(data) > cls.MAX_BYTES:
        raise TooLarge(f"{type_name} body is {len(data)} bytes, over its cap of {cls.MAX_BYTES}")
    decoder = _DECODERS.get(type_name)
    if decoder is None:  # built on first use: a class is not complete inside __init_subclass__
        decoder = _DECODERS[type_name] = msgspec.msgpack.Decoder(cls)
    try:
        msg: Message = decoder.decode(data)
    except ValueError as e:  # msgspec.DecodeError, and UnicodeDecodeError for invalid UTF-8
        raise DecodeError(f"bad {type_name}: {e}") from None
    return msg


def decode_struct(data: bytes, type_: type[Any], what: str) -> Any:
    """Strictly decode bytes as a non-message struct (envelope header, stream frame)."""
    try:
        return msgspec.msgpack.decode(data, type=type_)
    except ValueError as e:  # msgspec.DecodeError, and UnicodeDecodeError for invalid UTF-8
        raise DecodeError(f"bad {what}: {_name_positions(str(e), type_)}") from None


def _name_positions(error: str, type_: type[Any]) -> str:
    """Array-shaped structs report ``$[3]``; say ``$.timestamp_ms`` instead."""
    if isinstance(type_, type) and issubclass(type_, msgspec.Struct):
        for i, field in enumerate(type_.__struct_fields__):
            error = error.replace(f"`$[{i}]`", f"`$.{field}`")
    return error


def encode_struct(obj: Any) -> bytes:
    return _ENCODER.encode(obj)


def read_toml(path: Path) -> dict[str, Any]:
    """A TOML file a person wrote (a config, a run spec); ``ConfigError`` naming the file if it
    is missing or not TOML."""
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
