/* ChaCha20-Poly1305 (RFC 8439) sealed and opened in place with libcrypto's implementation, called through its
 * provider's functions (provider-cipher(7)) rather than the EVP_Encrypt and EVP_Decrypt calls.
 *
 * Why: in OpenSSL 3 every EVP_EncryptInit_ex, Update, Final and EVP_CIPHER_CTX_ctrl call passes through EVP's
 * generic layer (the IV length asked of the provider as a parameter, parameter arrays built and searched by name)
 * before it reaches the provider. A WireGuard message is sealed with a fresh nonce, so every message pays that layer
 * four times: about a fifth of the time to seal a 1420-byte message. The provider's own functions do the same work
 * without it. They are found once, through OSSL_PROVIDER_query_operation(3), in the provider that EVP itself picks for
 * "ChaCha20-Poly1305" (the default one, or whatever the system's openssl.cnf configures).
 */
#ifndef FLANNEL_UDP_AEAD_H
#define FLANNEL_UDP_AEAD_H

#include <stdint.h>
#include <string.h>
#include <strings.h>
#include <openssl/core_dispatch.h>
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/provider.h>

#define AEAD_KEY_LEN 32
#define AEAD_NONCE_LEN 12
#define AEAD_TAG_LEN 16

typedef struct {
    EVP_CIPHER *cipher; /* keeps the provider loaded while ctx lives */
    void *ctx;          /* the provider's cipher context */
    OSSL_FUNC_cipher_freectx_fn *freectx;
    OSSL_FUNC_cipher_encrypt_init_fn *init; /* encrypt_init or decrypt_init: the same signature */
    OSSL_FUNC_cipher_update_fn *update;
    OSSL_FUNC_cipher_final_fn *final;
    OSSL_FUNC_cipher_get_ctx_params_fn *get_params;
    OSSL_FUNC_cipher_set_ctx_params_fn *set_params;
} Aead;

/* Whether the provider's ':'-separated list of names holds name (case-insensitively, as libcrypto compares them). */
static int aead_names_hold(const char *names, const char *name) {
    size_t length = strlen(name);
    const char *p = names;
    while (p != NULL) {
        if (strncasecmp(p, name, length) == 0 && (p[length] == ':' || p[length] == '\0'))
            return 1;
        p = strchr(p, ':');
        if (p != NULL)
            p++;
    }
    return 0;
}

static void aead_take(Aead *a, const OSSL_DISPATCH *d, int encrypting) {
    for (; d->function_id != 0; d++) {
        switch (d->function_id) {
        case OSSL_FUNC_CIPHER_NEWCTX:
            a->ctx = OSSL_FUNC_cipher_newctx(d)(OSSL_PROVIDER_get0_provider_ctx(EVP_CIPHER_get0_provider(a->cipher)));
            break;
        case OSSL_FUNC_CIPHER_FREECTX: a->freectx = OSSL_FUNC_cipher_freectx(d); break;
        case OSSL_FUNC_CIPHER_ENCRYPT_INIT: if (encrypting) a->init = OSSL_FUNC_cipher_encrypt_init(d); break;
        case OSSL_FUNC_CIPHER_DECRYPT_INIT: if (!encrypting) a->init = OSSL_FUNC_cipher_decrypt_init(d); break;
        case OSSL_FUNC_CIPHER_UPDATE: a->update = OSSL_FUNC_cipher_update(d); break;
        case OSSL_FUNC_CIPHER_FINAL: a->final = OSSL_FUNC_cipher_final(d); break;
        case OSSL_FUNC_CIPHER_GET_CTX_PARAMS: a->get_params = OSSL_FUNC_cipher_get_ctx_params(d); break;
        case OSSL_FUNC_CIPHER_SET_CTX_PARAMS: a->set_params = OSSL_FUNC_cipher_set_ctx_params(d); break;
        }
    }
}

static void aead_free(Aead *a) {
    if (a->ctx != NULL && a->freectx != NULL)
        a->freectx(a->ctx); /* the provider wipes the key */
    EVP_CIPHER_free(a->cipher);
    memset(a, 0, sizeof(*a));
}

/* 0, or -1 when libcrypto has no usable ChaCha20-Poly1305 (a with nothing held). */
static int aead_new(Aead *a, int encrypting) {
    static const char name[] = "ChaCha20-Poly1305";
    const OSSL_ALGORITHM *algorithms;
    OSSL_PROVIDER *provider;
    int no_store = 0;
    memset(a, 0, sizeof(*a));
    a->cipher = EVP_CIPHER_fetch(NULL, name, NULL);
    if (a->cipher == NULL)
        return -1;
    provider = (OSSL_PROVIDER *)EVP_CIPHER_get0_provider(a->cipher);
    algorithms = OSSL_PROVIDER_query_operation(provider, OSSL_OP_CIPHER, &no_store);
    for (const OSSL_ALGORITHM *alg = algorithms; alg != NULL && alg->algorithm_names != NULL; alg++) {
        if (aead_names_hold(alg->algorithm_names, name)) {
            aead_take(a, alg->implementation, encrypting);
            break;
        }
    }
    if (algorithms != NULL)
        OSSL_PROVIDER_unquery_operation(provider, OSSL_OP_CIPHER, algorithms);
    if (a->ctx == NULL || a->freectx == NULL || a->init == NULL || a->update == NULL || a->final == NULL
        || a->get_params == NULL || a->set_params == NULL) {
        aead_free(a);
        return -1;
    }
    return 0;
}

/* Seal data[0:length] in place under key (NULL: the key this Aead was last given) and nonce; the tag into tag.
 * 1 on success. */
static int aead_seal(Aead *a, const uint8_t *key, const uint8_t *nonce, uint8_t *data, size_t length, uint8_t *tag) {
    size_t done;
    OSSL_PARAM params[2] = {OSSL_PARAM_octet_string(OSSL_CIPHER_PARAM_AEAD_TAG, tag, AEAD_TAG_LEN), OSSL_PARAM_END};
    if (a->init(a->ctx, key, key ? AEAD_KEY_LEN : 0, nonce, AEAD_NONCE_LEN, NULL) != 1)
        return 0;
    if (length && a->update(a->ctx, data, &done, length, data, length) != 1)
        return 0;
    return a->final(a->ctx, data + length, &done, 0) == 1 && a->get_params(a->ctx, params) == 1;
}

/* Open data[0:length] in place under key (NULL: the key last given) and nonce; 1 if tag authenticates it (compared
 * in constant time by libcrypto), 0 otherwise (data is then garbage). */
static int aead_open(Aead *a, const uint8_t *key, const uint8_t *nonce, uint8_t *data, size_t length,
                     const uint8_t *tag) {
    size_t done;
    OSSL_PARAM params[2] = {OSSL_PARAM_octet_string(OSSL_CIPHER_PARAM_AEAD_TAG, (void *)tag, AEAD_TAG_LEN),
                            OSSL_PARAM_END};
    if (a->init(a->ctx, key, key ? AEAD_KEY_LEN : 0, nonce, AEAD_NONCE_LEN, NULL) != 1)
        return 0;
    if (length && a->update(a->ctx, data, &done, length, data, length) != 1)
        return 0;
    return a->set_params(a->ctx, params) == 1 && a->final(a->ctx, data + length, &done, 0) == 1;
}

#endif
