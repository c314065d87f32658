"""
Certificates made in the test (with C{cryptography}, which comes with
Twisted's C{tls} extra): no openssl command, nothing on disk but what the
test writes.
"""

import datetime
import ssl

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def write_certificate(cert_path, key_path, common_name, days=30):
    """
    Write a self-signed certificate for C{common_name} and its key (PEM);
    return the certificate's SHA-256 fingerprint (hex, as C{/status} shows it).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=days))
            .sign(key, hashes.SHA256()))
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert.fingerprint(hashes.SHA256()).hex()


def peer_common_name(sock):
    """
    The common name of the certificate the server presented on C{sock}.
    """
    cert = x509.load_der_x509_certificate(sock.getpeercert(binary_form=True))
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def client_context():
    """
    A client context that accepts the test's self-signed certificates.
    """
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context
