"""
TLS listeners (C{--tls-port ssl:8443:privateKey=key.pem:certKey=cert.pem}):
the TCP socket is handed from generation to generation like any other; the
certificate and key are not. Each generation loads them from their files
when it starts, so an upgrade after the files were replaced serves the new
certificate to new connections, while connections opened before stay with
the old generation, and its old certificate, until they drain. A file that
cannot be read, is not PEM, or a key that does not match the certificate
stops the new generation before it serves: the upgrade fails and the old
generation serves on with the certificate it has.

The keywords are Twisted's own C{ssl:} endpoint's, turned into a context
factory by Twisted's own parser (L{twisted_graceful._twisted.ssl_context},
docs/design.md, fact 30);
files are relative to the working directory, which every generation
shares.
"""

import hashlib
import os

from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import crypto
from twisted.internet import error, ssl
from twisted.protocols.tls import TLSMemoryBIOFactory

from twisted_graceful._twisted import ssl_context
from twisted_graceful.listeners import CertificateError

__all__ = ["CertificateError", "LoadedCertificate", "load_certificate", "tls_factory"]


class LoadedCertificate:
    """
    What one generation serves on a TLS listener: the context factory and a
    description of its certificate, for C{/status} and the metrics.

    @ivar context_factory: a C{CertificateOptions} (its context is built, so
        that every problem shows at start).
    @ivar subject, sha256, not_after, not_after_text, serial: the certificate's.
    """

    def __init__(self, context_factory, certificate_pem_path):
        self.context_factory = context_factory
        self.path = certificate_pem_path
        cert = context_factory.certificate.to_cryptography()
        self.subject = cert.subject.rfc4514_string()
        self.serial = format(cert.serial_number, "x")
        self.sha256 = hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()
        after = cert.not_valid_after_utc
        self.not_after = after.timestamp()
        self.not_after_text = after.strftime("%Y-%m-%dT%H:%M:%SZ")

    def as_dict(self):
        return {"subject": self.subject, "serial": self.serial, "sha256": self.sha256,
                "not_after": self.not_after_text, "certificate": self.path}


def load_certificate(spec, option="--tls-port"):
    """
    Load the certificate and key C{spec} names (Twisted's C{ssl:} keywords,
    relative to the working directory) and check that they belong together.

    @return: a L{LoadedCertificate}.
    @raise CertificateError: naming C{option}, the file and the reason.
    """
    keywords = dict(spec.tls)
    key_path = keywords.get("privateKey", "server.pem")
    cert_path = keywords.get("certKey", key_path)
    where = f"{option} {spec.description}"
    # Each file on its own first, so that the error names the one at fault.
    for what, keyword, path in (("certificate", "certKey", cert_path),
                                ("private key", "privateKey", key_path)):
        try:
            with open(path, "rb") as f:
                pem = f.read()
        except OSError as e:
            raise CertificateError(f"{where}: cannot read the {what} ({keyword}={path}): "
                                   f"{e.strerror or e}")
        try:
            if what == "certificate":
                ssl.Certificate.loadPEM(pem)
            else:
                ssl.KeyPair.load(pem, crypto.FILETYPE_PEM)
        except Exception as e:
            raise CertificateError(f"{where}: {keyword}={path} is not a PEM {what} "
                                   f"({_openssl_reason(e)})")
    try:
        factory = ssl_context(keywords)
        factory.getContext()  # builds the context: every remaining problem shows now
    except error.VerifyError:
        raise CertificateError(f"{where}: the private key (privateKey={key_path}) does not "
                               f"match the certificate (certKey={cert_path})")
    except (OSError, AttributeError, ValueError) as e:
        raise CertificateError(f"{where}: {e}")
    except Exception as e:
        raise CertificateError(f"{where}: the certificate or key cannot be used "
                               f"({_openssl_reason(e)})")
    return LoadedCertificate(factory, os.path.abspath(cert_path))


def _openssl_reason(e):
    # OpenSSL.crypto.Error / SSL.Error: args[0] is [(library, function, reason)].
    details = e.args[0] if e.args and isinstance(e.args[0], list) else None
    if details:
        return "; ".join(": ".join(part for part in item if part) for item in details)
    return str(e) or type(e).__name__


def tls_factory(certificate, factory):
    """
    C{factory}'s protocol, served over TLS with C{certificate}.
    """
    return TLSMemoryBIOFactory(certificate.context_factory, False, factory)

