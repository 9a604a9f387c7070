"""ChaCha20-Poly1305 sealed and opened in place by libcrypto, called through its provider (aead.h says why)."""
from libc.stdint cimport uint8_t


cdef extern from "aead.h" nogil:
    ctypedef struct Aead:
        pass
    int aead_new(Aead* a, int encrypting)  # 0, or -1 without a usable ChaCha20-Poly1305
    void aead_free(Aead* a)
    # Both take key NULL for the key last given, and return 1 on success (for aead_open: the tag authenticates).
    int aead_seal(Aead* a, const uint8_t* key, const uint8_t* nonce, uint8_t* data, size_t length, uint8_t* tag)
    int aead_open(Aead* a, const uint8_t* key, const uint8_t* nonce, uint8_t* data, size_t length, const uint8_t* tag)
