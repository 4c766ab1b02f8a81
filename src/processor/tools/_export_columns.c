/* Native build of the analytics export's Arrow column buffers from raw stream entries.
 *
 * export_columns(items, max_entry_bytes, max_io_elements) takes the items of a raw
 * XREADGROUP reply ([id, [b"v", v, b"imei", imei, b"payload", payload]] each) and writes
 * the columns of processor/tools/export_schema.py's SCHEMA straight from the payload
 * bytes: no Record, no dict, no Python object per entry or per IO element.
 *
 * It takes an entry only when it is certain that the contract decoder
 * (processor/core/contract.py: decode_entry) gives a Record for it, and then writes
 * exactly that Record's row (records_to_batch): the same values, the same IO text
 * (jsonenc.io_json: ids as keys in payload order, integers, bytes as lowercase hex).
 * Any entry it is not certain of is left out and its index returned in ``skipped``: the
 * caller decodes those with the contract decoder, which accepts or rejects them and
 * names the reason. So this parser accepts a strict subset of what msgspec accepts:
 * - compact or spaced JSON, keys without escapes, each known key at most once, the
 *   twelve required ones present, ``generation`` an integer, null or absent;
 * - integers in JSON's grammar (no fraction or exponent for integer fields; at most 18
 *   digits), floats in JSON's grammar (at most 63 characters, converted exactly: see
 *   float_at), every contract range checked;
 * - IO ids in canonical decimal (no leading zero, at most 65535), no id twice;
 *   values unsigned 32-bit integers or a sentinel object with exactly one key:
 *   "$bigint" (1 to 20 ASCII digits, at most 2^64 - 1) or "$bytes" (canonical base64:
 *   padded, standard alphabet, unused bits zero).
 * Anything else (escapes, non-ASCII bytes, other field shapes, limits exceeded) is
 * skipped. tests/unit/test_export_columns.py checks the equality on generated entries.
 *
 * The reply's entries are looked at with the GIL held; their payloads are parsed with
 * it released, so that a second thread can read and parse the next reply meanwhile.
 *
 * Returns (rows, buffers, generation_nulls, skipped): ``buffers`` holds, in SCHEMA order,
 * (offsets, data) for a string column, (validity or None, data) for ``generation``, and
 * the data alone for every other column, little-endian, as Arrow lays them out.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <locale.h>
#include <stdlib.h>
#include <string.h>

#include "../_cbuffer.h"

#define MAX_TS_MS 253402300799999LL
#define MAX_U32 4294967295LL
#define FIELD_NAME_BYTES 12 /* len("v") + len("imei") + len("payload") */
#define IMEI_DIGITS 15
#define MAX_INT_DIGITS 18
#define MAX_FLOAT_CHARS 63

/* The payload's keys, in the bit order of ``seen``. */
enum {
    K_CODEC, K_TS, K_RECEIVED_AT, K_PRIORITY, K_LAT, K_LON, K_ALT, K_ANGLE, K_SAT,
    K_SPEED, K_EVENT_IO, K_IO, K_GENERATION, NKEYS
};
#define REQUIRED_KEYS ((1u << K_GENERATION) - 1u) /* every key but generation */

static const struct {
    const char *name;
    Py_ssize_t len;
} KEYS[NKEYS] = {
    {"codec", 5}, {"ts", 2},     {"received_at", 11}, {"priority", 8}, {"lat", 3},
    {"lon", 3},   {"alt", 3},    {"angle", 5},        {"sat", 3},      {"speed", 5},
    {"event_io", 8}, {"io", 2},  {"generation", 10},
};

typedef struct {
    int64_t ints[NKEYS]; /* by key; lat, lon and io unused */
    double lat, lon;
    int generation; /* -1: null or absent */
} Row;

/* The parser reads a payload's bytes up to the NUL that ends every bytes object's data
 * (the NUL stops every scan below; an embedded one makes the entry skipped). Positions
 * are passed and returned as values, NULL for "not certain", so that they stay in
 * registers. */
#define INLINE static inline __attribute__((always_inline))

INLINE int
is_digit(char c)
{
    return (unsigned char)(c - '0') < 10;
}

INLINE const char *
skip(const char *p)
{
    while (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t')
        p++;
    return p;
}

/* After ``ch`` (spaces before it skipped), or NULL. */
INLINE const char *
expect(const char *p, char ch)
{
    p = skip(p);
    return *p == ch ? p + 1 : NULL;
}

/* A string without escapes: its content in ``start``/``len``; after its closing quote. */
INLINE const char *
string_at(const char *p, const char **start, Py_ssize_t *len)
{
    p = skip(p);
    if (*p != '"')
        return NULL;
    const char *s = ++p;
    while (*p != '"') {
        if (*p == '\\' || *p == '\0')
            return NULL;
        p++;
    }
    *start = s;
    *len = p - s;
    return p + 1;
}

/* A JSON number's integer part (0, or digits without a leading zero) of at most
 * MAX_INT_DIGITS digits, its value in ``value``. */
INLINE const char *
integer_at(const char *p, uint64_t *value)
{
    if (!is_digit(*p))
        return NULL;
    if (*p == '0') {
        *value = 0;
        return is_digit(p[1]) ? NULL : p + 1; /* "01" is not JSON */
    }
    const char *start = p;
    uint64_t v = 0;
    do
        v = v * 10 + (uint64_t)(*p++ - '0');
    while (is_digit(*p));
    if (p - start > MAX_INT_DIGITS)
        return NULL;
    *value = v;
    return p;
}

/* A JSON integer (no fraction, no exponent: msgspec rejects those for an int). */
INLINE const char *
int_at(const char *p, int64_t *out)
{
    p = skip(p);
    int negative = *p == '-';
    uint64_t value;
    p = integer_at(p + negative, &value);
    if (p == NULL || *p == '.' || *p == 'e' || *p == 'E')
        return NULL;
    *out = negative ? -(int64_t)value : (int64_t)value;
    return p;
}

/* The "C" locale, for strtod_l: a decimal point whatever the process's locale. */
static locale_t c_locale;

/* 10^k, exact in a double for k <= 22. */
static const double POW10[] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,
                               1e8,  1e9,  1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
                               1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};

/* A JSON number for a float field. An integer converts as msgspec converts it (so "-0"
 * is 0.0). A decimal of at most 2^53 in its digits and at most 22 decimals is m / 10^k,
 * both exact doubles, so the division is the correctly rounded value (the classic fast
 * path of decimal conversion); any other number goes through the C library's correctly
 * rounded conversion (glibc's strtod is exact), as msgspec's is. */
INLINE const char *
float_at(const char *p, double *out)
{
    p = skip(p);
    const char *start = p;
    int negative = *p == '-';
    uint64_t whole;
    p = integer_at(p + negative, &whole);
    if (p == NULL)
        return NULL;
    if (*p != '.' && *p != 'e' && *p != 'E') {
        *out = (double)(negative ? -(int64_t)whole : (int64_t)whole);
        return p;
    }
    uint64_t mantissa = whole;
    int decimals = 0, exact = 1;
    if (*p == '.') {
        p++;
        if (!is_digit(*p))
            return NULL;
        for (; is_digit(*p); p++, decimals++) {
            if (mantissa > (1ULL << 53) / 10)
                exact = 0;
            else
                mantissa = mantissa * 10 + (uint64_t)(*p - '0');
        }
    }
    if (*p == 'e' || *p == 'E') {
        p++;
        p += *p == '+' || *p == '-';
        if (!is_digit(*p))
            return NULL;
        while (is_digit(*p))
            p++;
        exact = 0;
    }
    if (exact && decimals <= 22 && mantissa <= (1ULL << 53)) {
        double value = (double)mantissa / POW10[decimals];
        *out = negative ? -value : value;
        return p;
    }
    Py_ssize_t len = p - start;
    if (len > MAX_FLOAT_CHARS)
        return NULL;
    char text[MAX_FLOAT_CHARS + 1];
    memcpy(text, start, (size_t)len);
    text[len] = '\0';
    char *stop = NULL;
    double value = strtod_l(text, &stop, c_locale); /* correctly rounded, "." always */
    if (stop != text + len)
        return NULL;
    *out = value;
    return p;
}

INLINE char *
write_u64(char *out, uint64_t value)
{
    char digits[20];
    int n = 0;
    do {
        digits[n++] = (char)('0' + value % 10);
        value /= 10;
    } while (value);
    while (n)
        *out++ = digits[--n];
    return out;
}

static const signed char BASE64[256] = {
    ['A'] = 1,  ['B'] = 2,  ['C'] = 3,  ['D'] = 4,  ['E'] = 5,  ['F'] = 6,  ['G'] = 7,
    ['H'] = 8,  ['I'] = 9,  ['J'] = 10, ['K'] = 11, ['L'] = 12, ['M'] = 13, ['N'] = 14,
    ['O'] = 15, ['P'] = 16, ['Q'] = 17, ['R'] = 18, ['S'] = 19, ['T'] = 20, ['U'] = 21,
    ['V'] = 22, ['W'] = 23, ['X'] = 24, ['Y'] = 25, ['Z'] = 26, ['a'] = 27, ['b'] = 28,
    ['c'] = 29, ['d'] = 30, ['e'] = 31, ['f'] = 32, ['g'] = 33, ['h'] = 34, ['i'] = 35,
    ['j'] = 36, ['k'] = 37, ['l'] = 38, ['m'] = 39, ['n'] = 40, ['o'] = 41, ['p'] = 42,
    ['q'] = 43, ['r'] = 44, ['s'] = 45, ['t'] = 46, ['u'] = 47, ['v'] = 48, ['w'] = 49,
    ['x'] = 50, ['y'] = 51, ['z'] = 52, ['0'] = 53, ['1'] = 54, ['2'] = 55, ['3'] = 56,
    ['4'] = 57, ['5'] = 58, ['6'] = 59, ['7'] = 60, ['8'] = 61, ['9'] = 62, ['+'] = 63,
    ['/'] = 64,
}; /* value + 1; 0: not in the alphabet */

static const char HEX[] = "0123456789abcdef";

/* ``"<hex>"`` of canonical base64 ``s`` written at ``out`` (room for 2 + len * 3 / 2);
 * after it, or NULL when ``s`` is not canonical base64. */
INLINE char *
base64_hex(char *out, const char *s, Py_ssize_t len)
{
    if (len % 4)
        return NULL;
    int pad = 0;
    if (len && s[len - 1] == '=')
        pad = s[len - 2] == '=' ? 2 : 1;
    *out++ = '"';
    for (Py_ssize_t i = 0; i < len; i += 4) {
        int last = i + 4 == len;
        int quads = last ? 4 - pad : 4;
        uint32_t bits = 0;
        for (int k = 0; k < 4; k++) {
            uint32_t v = 0;
            if (k < quads) {
                signed char d = BASE64[(unsigned char)s[i + k]];
                if (!d)
                    return NULL;
                v = (uint32_t)(d - 1);
            }
            bits = bits << 6 | v;
        }
        unsigned char bytes[3] = {(unsigned char)(bits >> 16), (unsigned char)(bits >> 8),
                                  (unsigned char)bits};
        int keep = last ? 3 - pad : 3;
        if (keep < 3 && bytes[keep] != 0)
            return NULL; /* unused bits set: not canonical */
        for (int k = 0; k < keep; k++) {
            *out++ = HEX[bytes[k] >> 4];
            *out++ = HEX[bytes[k] & 15];
        }
    }
    *out++ = '"';
    return out;
}

/* A sentinel object (its "{" read) written at ``*out`` as its value; after it, or NULL. */
INLINE const char *
sentinel_at(const char *p, char **out)
{
    const char *key, *value;
    Py_ssize_t key_len, value_len;
    if ((p = string_at(p, &key, &key_len)) == NULL || (p = expect(p, ':')) == NULL ||
        (p = string_at(p, &value, &value_len)) == NULL || (p = expect(p, '}')) == NULL)
        return NULL;
    if (key_len == 7 && memcmp(key, "$bigint", 7) == 0) {
        if (value_len == 0 || value_len > 20)
            return NULL;
        uint64_t number = 0;
        for (Py_ssize_t i = 0; i < value_len; i++) {
            if (!is_digit(value[i]))
                return NULL;
            uint64_t digit = (uint64_t)(value[i] - '0');
            if (number > (UINT64_MAX - digit) / 10)
                return NULL; /* beyond 64 bits: the decoder's out_of_range */
            number = number * 10 + digit;
        }
        *out = write_u64(*out, number);
        return p;
    }
    if (key_len == 6 && memcmp(key, "$bytes", 6) == 0) {
        char *end = base64_hex(*out, value, value_len);
        if (end == NULL)
            return NULL;
        *out = end;
        return p;
    }
    return NULL;
}

typedef struct {
    uint8_t *seen;    /* a bit per IO id: ids of the object being read */
    uint16_t *ids;    /* those ids, to clear their bits */
    Py_ssize_t count; /* ids in ``ids`` */
    Py_ssize_t max_io;
} IoIds;

/* The io object written at ``*out`` as its JSON text; after it, or NULL. The ids
 * marked in ``seen`` are left for the caller to clear. */
INLINE const char *
io_at(const char *p, char **out, IoIds *io)
{
    char *o = *out;
    if ((p = expect(p, '{')) == NULL)
        return NULL;
    *o++ = '{';
    p = skip(p);
    if (*p != '}') {
        for (;;) {
            const char *key;
            Py_ssize_t key_len;
            if ((p = string_at(p, &key, &key_len)) == NULL || key_len == 0 || key_len > 5 ||
                (key[0] == '0' && key_len > 1))
                return NULL;
            uint32_t id = 0;
            for (Py_ssize_t i = 0; i < key_len; i++) {
                if (!is_digit(key[i]))
                    return NULL;
                id = id * 10 + (uint32_t)(key[i] - '0');
            }
            if (id > 65535 || (io->seen[id >> 3] >> (id & 7) & 1) || io->count == io->max_io)
                return NULL;
            io->seen[id >> 3] |= (uint8_t)(1u << (id & 7));
            io->ids[io->count++] = (uint16_t)id;
            if ((p = expect(p, ':')) == NULL)
                return NULL;
            if (io->count > 1)
                *o++ = ',';
            *o++ = '"';
            memcpy(o, key, (size_t)key_len);
            o += key_len;
            *o++ = '"';
            *o++ = ':';
            p = skip(p);
            if (*p == '{') {
                if ((p = sentinel_at(p + 1, &o)) == NULL)
                    return NULL;
            }
            else {
                int64_t value;
                const char *digits = p;
                if ((p = int_at(p, &value)) == NULL || value < 0 || value > MAX_U32)
                    return NULL;
                if (*digits == '-') /* "-0": written as msgspec writes 0 */
                    *o++ = '0';
                else {
                    memcpy(o, digits, (size_t)(p - digits));
                    o += p - digits;
                }
            }
            p = skip(p);
            if (*p != ',')
                break;
            p++;
        }
    }
    if ((p = expect(p, '}')) == NULL)
        return NULL;
    *o++ = '}';
    *out = o;
    return p;
}

/* The payload key ``k`` (``n`` bytes) is, NKEYS when none. */
INLINE int
key_index(const char *k, Py_ssize_t n)
{
    int i;
    switch (n) {
    case 2:
        i = k[0] == 't' ? K_TS : K_IO;
        break;
    case 3:
        i = k[0] == 'l' ? (k[1] == 'a' ? K_LAT : K_LON) : k[0] == 'a' ? K_ALT : K_SAT;
        break;
    case 5:
        i = k[0] == 'c' ? K_CODEC : k[0] == 'a' ? K_ANGLE : K_SPEED;
        break;
    case 8:
        i = k[0] == 'p' ? K_PRIORITY : K_EVENT_IO;
        break;
    case 10:
        i = K_GENERATION;
        break;
    case 11:
        i = K_RECEIVED_AT;
        break;
    default:
        return NKEYS;
    }
    return memcmp(KEYS[i].name, k, (size_t)n) == 0 ? i : NKEYS;
}

/* The payload ``data`` (``len`` bytes, NUL after them) parsed into ``row``, its IO text
 * written at ``*out`` (room for 2 * len + 16): 1 when taken, else 0. */
static int
payload_row(const char *data, Py_ssize_t len, Row *row, char **out, IoIds *io)
{
    const char *p = data;
    unsigned present = 0;
    row->generation = -1;
    if ((p = expect(p, '{')) == NULL)
        return 0;
    for (;;) {
        const char *key;
        Py_ssize_t key_len;
        if ((p = string_at(p, &key, &key_len)) == NULL || (p = expect(p, ':')) == NULL)
            return 0;
        int k = key_index(key, key_len);
        if (k == NKEYS || (present >> k & 1))
            return 0; /* unknown or repeated key */
        present |= 1u << k;
        if (k == K_IO) {
            if ((p = io_at(p, out, io)) == NULL)
                return 0;
        }
        else if (k == K_LAT || k == K_LON) {
            double value;
            if ((p = float_at(p, &value)) == NULL)
                return 0;
            if (k == K_LAT ? !(value >= -90.0 && value <= 90.0)
                           : !(value >= -180.0 && value <= 180.0))
                return 0;
            *(k == K_LAT ? &row->lat : &row->lon) = value;
        }
        else if (k == K_GENERATION && (p = skip(p))[0] == 'n' && p[1] == 'u' && p[2] == 'l' &&
                 p[3] == 'l') {
            p += 4;
        }
        else {
            int64_t v;
            if ((p = int_at(p, &v)) == NULL)
                return 0;
            int64_t low = 0, high;
            switch (k) {
            case K_CODEC:
                if (v != 8 && v != 16 && v != 142)
                    return 0;
                high = v;
                break;
            case K_TS:
            case K_RECEIVED_AT:
                high = MAX_TS_MS;
                break;
            case K_PRIORITY:
                high = 2;
                break;
            case K_ALT:
                low = -32768;
                high = 32767;
                break;
            case K_ANGLE:
                high = 359;
                break;
            case K_SAT:
            case K_GENERATION:
                high = 255;
                break;
            default: /* speed, event_io */
                high = 65535;
            }
            if (v < low || v > high)
                return 0;
            row->ints[k] = v;
            if (k == K_GENERATION)
                row->generation = (int)v;
        }
        p = skip(p);
        if (*p != ',')
            break;
        p++;
    }
    if ((p = expect(p, '}')) == NULL)
        return 0;
    p = skip(p);
    return p == data + len && (present & REQUIRED_KEYS) == REQUIRED_KEYS;
}

/* Fixed-width columns, in SCHEMA order (strings and generation apart). */
enum {
    F_DEVICE_ID, F_TS, F_RECEIVED_AT, F_LAT, F_LON, F_ALT, F_ANGLE, F_SAT, F_SPEED,
    F_PRIORITY, F_EVENT_IO, F_CODEC, F_GENERATION, NFIXED
};
static const int WIDTH[NFIXED] = {8, 8, 8, 8, 8, 4, 2, 2, 4, 1, 4, 2, 2};

/* An entry of the contract's shape, as pointers into its bytes objects (which the reply
 * keeps alive); ``payload`` NULL for an entry of any other shape. */
typedef struct {
    const char *id, *imei, *payload;
    Py_ssize_t id_len, payload_len;
} Entry;

typedef struct {
    char *fixed[NFIXED];
    uint8_t *validity;
    int32_t *imei_offsets, *id_offsets, *io_offsets;
    Buffer imeis, ids, io;
    IoIds io_ids;
    Entry *entries; /* the reply's entries, read with the GIL held */
    Py_ssize_t *skipped; /* indices of the entries not taken */
} Columns;

static void
columns_free(Columns *cols)
{
    for (int f = 0; f < NFIXED; f++)
        PyMem_RawFree(cols->fixed[f]);
    PyMem_RawFree(cols->validity);
    PyMem_RawFree(cols->imei_offsets);
    PyMem_RawFree(cols->id_offsets);
    PyMem_RawFree(cols->io_offsets);
    buffer_free(&cols->imeis);
    buffer_free(&cols->ids);
    buffer_free(&cols->io);
    PyMem_RawFree(cols->io_ids.seen);
    PyMem_RawFree(cols->io_ids.ids);
    PyMem_RawFree(cols->entries);
    PyMem_RawFree(cols->skipped);
}

#define STORE(f, type, value)                                                               \
    do {                                                                                    \
        type v_ = (type)(value);                                                            \
        memcpy(cols->fixed[f] + rows * (Py_ssize_t)sizeof(type), &v_, sizeof(type));         \
    } while (0)

/* Sets ``e``'s IMEI and payload from an entry's ``count`` field names and values when
 * they have the contract's shape: three fields in order, version "1", a 15-byte IMEI,
 * within the size limit; else leaves ``e->payload`` NULL (the entry is skipped). */
static int
contract_shape(Entry *e, Py_ssize_t count, const char *const value[6],
               const Py_ssize_t len[6], Py_ssize_t max_bytes)
{
    if (count != 6 || len[0] != 1 || value[0][0] != 'v' || len[2] != 4 ||
        memcmp(value[2], "imei", 4) != 0 || len[4] != 7 || memcmp(value[4], "payload", 7) != 0 ||
        len[1] != 1 || value[1][0] != '1' || len[3] != IMEI_DIGITS ||
        FIELD_NAME_BYTES + 1 + IMEI_DIGITS + len[5] > max_bytes)
        return 0;
    e->imei = value[3];
    e->payload = value[5];
    e->payload_len = len[5];
    return 1;
}

/* The entry ``item`` of a parsed reply (``[id, [name, value, ...]]``) in ``e``: its id,
 * and its IMEI and payload when it has the contract's shape. With the GIL held. */
static void
entry_of(PyObject *item, Py_ssize_t max_bytes, Entry *e)
{
    e->payload = NULL;
    if (!PyList_CheckExact(item) || PyList_GET_SIZE(item) != 2)
        return;
    PyObject *sid = PyList_GET_ITEM(item, 0), *flat = PyList_GET_ITEM(item, 1);
    if (!PyBytes_CheckExact(sid) || !PyList_CheckExact(flat) || PyList_GET_SIZE(flat) != 6)
        return;
    const char *value[6];
    Py_ssize_t len[6];
    for (int k = 0; k < 6; k++) {
        PyObject *field = PyList_GET_ITEM(flat, k);
        if (!PyBytes_CheckExact(field))
            return;
        value[k] = PyBytes_AS_STRING(field);
        len[k] = PyBytes_GET_SIZE(field);
    }
    e->id = PyBytes_AS_STRING(sid);
    e->id_len = PyBytes_GET_SIZE(sid);
    contract_shape(e, 6, value, len, max_bytes);
}

enum { TAKEN = 1, SKIPPED = 0, NO_MEMORY = -1, TOO_LONG = -2 };

/* One entry's row appended (TAKEN), or SKIPPED, or an error. Without the GIL. */
static int
entry_row(Columns *cols, Py_ssize_t rows, const Entry *e)
{
    if (e->payload == NULL)
        return SKIPPED;
    const char *digits = e->imei;
    int64_t device_id = 0;
    for (int i = 0; i < IMEI_DIGITS; i++) {
        if (!is_digit(digits[i]))
            return SKIPPED;
        device_id = device_id * 10 + (digits[i] - '0');
    }
    for (Py_ssize_t i = 0; i < e->id_len; i++)
        if ((unsigned char)e->id[i] >= 0x80)
            return SKIPPED; /* a stream id is ASCII */
    Row row;
    if (buffer_grow(&cols->io, 2 * e->payload_len + 16) < 0) /* the IO text is never longer */
        return NO_MEMORY;
    char *out = cols->io.data + cols->io.len;
    IoIds *io = &cols->io_ids;
    int taken = payload_row(e->payload, e->payload_len, &row, &out, io);
    for (Py_ssize_t i = 0; i < io->count; i++)
        io->seen[io->ids[i] >> 3] = 0;
    io->count = 0;
    if (!taken)
        return SKIPPED;
    cols->io.len = out - cols->io.data;
    if (cols->io.len > INT32_MAX || cols->ids.len + e->id_len > INT32_MAX)
        return TOO_LONG;
    if (buffer_grow(&cols->ids, e->id_len) < 0)
        return NO_MEMORY;
    memcpy(cols->imeis.data + rows * IMEI_DIGITS, digits, IMEI_DIGITS);
    cols->imei_offsets[rows + 1] = (int32_t)((rows + 1) * IMEI_DIGITS);
    memcpy(cols->ids.data + cols->ids.len, e->id, (size_t)e->id_len);
    cols->ids.len += e->id_len;
    cols->id_offsets[rows + 1] = (int32_t)cols->ids.len;
    cols->io_offsets[rows + 1] = (int32_t)cols->io.len;
    STORE(F_DEVICE_ID, int64_t, device_id);
    STORE(F_TS, int64_t, row.ints[K_TS]);
    STORE(F_RECEIVED_AT, int64_t, row.ints[K_RECEIVED_AT]);
    STORE(F_LAT, double, row.lat);
    STORE(F_LON, double, row.lon);
    STORE(F_ALT, int32_t, row.ints[K_ALT]);
    STORE(F_ANGLE, int16_t, row.ints[K_ANGLE]);
    STORE(F_SAT, int16_t, row.ints[K_SAT]);
    STORE(F_SPEED, int32_t, row.ints[K_SPEED]);
    STORE(F_PRIORITY, int8_t, row.ints[K_PRIORITY]);
    STORE(F_EVENT_IO, int32_t, row.ints[K_EVENT_IO]);
    STORE(F_CODEC, int16_t, row.ints[K_CODEC]);
    STORE(F_GENERATION, int16_t, row.generation < 0 ? 0 : row.generation);
    if (row.generation >= 0)
        cols->validity[rows >> 3] |= (uint8_t)(1u << (rows & 7));
    return TAKEN;
}

static PyObject *
bytes_of(const void *data, Py_ssize_t len)
{
    return PyBytes_FromStringAndSize((const char *)data, len);
}

/* Columns for ``n`` entries allocated (``cols`` zeroed first); -1 with an exception. */
static int
columns_alloc(Columns *cols, Py_ssize_t n, Py_ssize_t max_io)
{
    Py_ssize_t slots = n ? n : 1;
    int failed = 0;
    for (int f = 0; f < NFIXED; f++)
        failed |= (cols->fixed[f] = PyMem_RawMalloc((size_t)(slots * WIDTH[f]))) == NULL;
    failed |= (cols->validity = PyMem_RawCalloc((size_t)(slots + 7) / 8, 1)) == NULL;
    failed |= (cols->imei_offsets = PyMem_RawCalloc((size_t)slots + 1, sizeof(int32_t))) == NULL;
    failed |= (cols->id_offsets = PyMem_RawCalloc((size_t)slots + 1, sizeof(int32_t))) == NULL;
    failed |= (cols->io_offsets = PyMem_RawCalloc((size_t)slots + 1, sizeof(int32_t))) == NULL;
    failed |= (cols->io_ids.seen = PyMem_RawCalloc(65536 / 8, 1)) == NULL;
    /* IO ids are distinct 16-bit numbers: never more than 65,536 in one object */
    size_t io_slots = (size_t)(max_io < 65536 ? max_io : 65536) + 1;
    failed |= (cols->io_ids.ids = PyMem_RawMalloc(io_slots * sizeof(uint16_t))) == NULL;
    cols->io_ids.max_io = max_io;
    failed |= (cols->entries = PyMem_RawCalloc((size_t)slots, sizeof(Entry))) == NULL;
    failed |= (cols->skipped = PyMem_RawMalloc((size_t)slots * sizeof(Py_ssize_t))) == NULL;
    failed |= buffer_grow(&cols->imeis, slots * IMEI_DIGITS) < 0 ||
              buffer_grow(&cols->io, slots * 256) < 0 || buffer_grow(&cols->ids, slots * 16) < 0;
    if (failed) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

/* The rows of ``cols->entries`` (``n`` of them, filled with the GIL held), parsed with the
 * GIL released: (rows, buffers, generation_nulls, skipped), or NULL with an exception.
 * The entries' bytes must stay alive and unchanged meanwhile (the caller holds them). */
static PyObject *
columns_build(Columns *cols, Py_ssize_t n)
{
    Py_ssize_t rows = 0, nulls = 0, nskipped = 0;
    int error = TAKEN;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        int taken = entry_row(cols, rows, &cols->entries[i]);
        if (taken == TAKEN) {
            nulls += !(cols->validity[rows >> 3] >> (rows & 7) & 1);
            rows++;
        }
        else if (taken == SKIPPED)
            cols->skipped[nskipped++] = i;
        else {
            error = taken;
            break;
        }
    }
    Py_END_ALLOW_THREADS
    if (error == NO_MEMORY)
        return PyErr_NoMemory();
    if (error == TOO_LONG) {
        PyErr_SetString(PyExc_OverflowError, "a column's text exceeds 2 GiB");
        return NULL;
    }
    PyObject *skipped = PyList_New(nskipped);
    if (skipped == NULL)
        return NULL;
    for (Py_ssize_t k = 0; k < nskipped; k++) {
        PyObject *index = PyLong_FromSsize_t(cols->skipped[k]);
        if (index == NULL) {
            Py_DECREF(skipped);
            return NULL;
        }
        PyList_SET_ITEM(skipped, k, index);
    }
    PyObject *buffers = PyTuple_New(NFIXED + 1 + 6);
    if (buffers == NULL) {
        Py_DECREF(skipped);
        return NULL;
    }
    Py_ssize_t slot = 0;
#define ADD(obj)                                                                            \
    do {                                                                                    \
        PyObject *o_ = (obj);                                                               \
        if (o_ == NULL) {                                                                   \
            Py_DECREF(buffers);                                                             \
            Py_DECREF(skipped);                                                             \
            return NULL;                                                                    \
        }                                                                                   \
        PyTuple_SET_ITEM(buffers, slot++, o_);                                              \
    } while (0)
    ADD(bytes_of(cols->imei_offsets, (rows + 1) * 4));
    ADD(bytes_of(cols->imeis.data, rows * IMEI_DIGITS));
    for (int f = F_DEVICE_ID; f < F_GENERATION; f++)
        ADD(bytes_of(cols->fixed[f], rows * WIDTH[f]));
    if (nulls) {
        ADD(bytes_of(cols->validity, (rows + 7) / 8));
    }
    else {
        ADD(Py_NewRef(Py_None));
    }
    ADD(bytes_of(cols->fixed[F_GENERATION], rows * WIDTH[F_GENERATION]));
    ADD(bytes_of(cols->id_offsets, (rows + 1) * 4));
    ADD(bytes_of(cols->ids.data, cols->ids.len));
    ADD(bytes_of(cols->io_offsets, (rows + 1) * 4));
    ADD(bytes_of(cols->io.data, cols->io.len));
#undef ADD
    return Py_BuildValue("(nNnN)", rows, buffers, nulls, skipped);
}

static int
limits_of(PyObject *const *args, Py_ssize_t *max_bytes, Py_ssize_t *max_io)
{
    *max_bytes = PyLong_AsSsize_t(args[0]);
    *max_io = PyLong_AsSsize_t(args[1]);
    if ((*max_bytes == -1 || *max_io == -1) && PyErr_Occurred())
        return -1;
    if (*max_io < 0)
        *max_io = 0;
    return 0;
}

static PyObject *
export_columns(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t max_bytes, max_io;
    if (nargs != 3 || !PyList_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError,
                        "export_columns(items: list, max_entry_bytes: int, max_io_elements: int)");
        return NULL;
    }
    if (limits_of(args + 1, &max_bytes, &max_io) < 0)
        return NULL;
    PyObject *items = args[0], *result = NULL;
    Py_ssize_t n = PyList_GET_SIZE(items);
    Columns cols;
    memset(&cols, 0, sizeof cols);
    if (columns_alloc(&cols, n, max_io) == 0) {
        for (Py_ssize_t i = 0; i < n; i++)
            entry_of(PyList_GET_ITEM(items, i), max_bytes, &cols.entries[i]);
        /* ``items`` (held by this call) keeps the entries' bytes alive */
        result = columns_build(&cols, n);
    }
    columns_free(&cols);
    return result;
}

/* --- Raw RESP2 replies ------------------------------------------------------------------
 * The exporter may read XREADGROUP's reply as bytes (no Python object per entry or field)
 * and hand it here whole: resp_scan says when the bytes hold the whole reply, and
 * export_reply builds the columns from it. */

#define RESP_DEPTH 8

/* "<type><integer>\r\n" at ``*pp``: the integer, after it; 0 when not there (yet). */
static int
resp_int(const char **pp, const char *end, char type, Py_ssize_t *out)
{
    const char *p = *pp;
    if (p >= end || *p != type)
        return 0;
    p++;
    int negative = p < end && *p == '-';
    p += negative;
    const char *start = p;
    Py_ssize_t value = 0;
    while (p < end && is_digit(*p)) {
        value = value * 10 + (*p - '0');
        if (++p - start > 18)
            return 0;
    }
    if (p == start || end - p < 2 || p[0] != '\r' || p[1] != '\n')
        return 0;
    *out = negative ? -value : value;
    *pp = p + 2;
    return 1;
}

/* A bulk string at ``*pp``: its data and length, after it; 0 when not there. */
static int
resp_bulk(const char **pp, const char *end, const char **data, Py_ssize_t *len)
{
    const char *p = *pp;
    Py_ssize_t n;
    if (!resp_int(&p, end, '$', &n) || n < 0 || end - p < n + 2)
        return 0;
    *data = p;
    *len = n;
    *pp = p + n + 2; /* the CRLF after the data is not looked at (see export_reply) */
    return 1;
}

/* resp_scan(buffer, end, pos, stack) -> (pos, stack), stack None once the reply is whole.
 * Resumable: ``stack`` holds the elements still expected at each open array (innermost
 * last), (1,) for a reply not begun; only the bytes from ``pos`` on are looked at. */
static PyObject *
resp_scan(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    if (nargs != 4 || !PyTuple_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "resp_scan(buffer, end: int, pos: int, stack: tuple)");
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t end_at = PyLong_AsSsize_t(args[1]), pos = PyLong_AsSsize_t(args[2]);
    Py_ssize_t counts[RESP_DEPTH], depth = PyTuple_GET_SIZE(args[3]);
    PyObject *result = NULL;
    if ((end_at == -1 || pos == -1) && PyErr_Occurred())
        goto finally;
    if (end_at > view.len || pos < 0 || pos > end_at || depth < 1 || depth > RESP_DEPTH) {
        PyErr_SetString(PyExc_ValueError, "resp_scan: position or stack out of range");
        goto finally;
    }
    for (Py_ssize_t d = 0; d < depth; d++)
        counts[d] = PyLong_AsSsize_t(PyTuple_GET_ITEM(args[3], d));
    if (PyErr_Occurred())
        goto finally;
    const char *base = view.buf, *p = base + pos, *end = base + end_at;
    while (depth) {
        const char *line = memchr(p, '\n', (size_t)(end - p));
        if (line == NULL)
            break; /* more bytes needed */
        const char *at = p;
        Py_ssize_t n = 0;
        switch (*p) {
        case '*':
            if (!resp_int(&at, end, '*', &n))
                goto malformed;
            p = at;
            if (n > 0) {
                if (depth == RESP_DEPTH)
                    goto malformed;
                counts[depth++] = n;
                continue; /* the array is whole when its elements are */
            }
            break;
        case '$':
            if (!resp_int(&at, end, '$', &n))
                goto malformed;
            if (n >= 0) {
                if (end - at < n + 2)
                    goto more; /* the data is not all here: read the header again then */
                at += n + 2;
            }
            p = at;
            break;
        case '+':
        case '-':
        case ':':
            p = line + 1;
            break;
        default:
            goto malformed;
        }
        /* an element is whole: so is every array it completes */
        while (depth && --counts[depth - 1] == 0)
            depth--;
    }
more:
    if (depth == 0) {
        result = Py_BuildValue("(nO)", (Py_ssize_t)(p - base), Py_None);
        goto finally;
    }
    PyObject *stack = PyTuple_New(depth);
    if (stack == NULL)
        goto finally;
    for (Py_ssize_t d = 0; d < depth; d++) {
        PyObject *count = PyLong_FromSsize_t(counts[d]);
        if (count == NULL) {
            Py_DECREF(stack);
            goto finally;
        }
        PyTuple_SET_ITEM(stack, d, count);
    }
    result = Py_BuildValue("(nN)", (Py_ssize_t)(p - base), stack);
    goto finally;
malformed:
    PyErr_SetString(PyExc_ValueError, "not a RESP2 reply");
finally:
    PyBuffer_Release(&view);
    return result;
}

/* The fields of the entry whose field array starts at ``p`` as a list of bytes (empty
 * for a nil array): what redis-py would give, for the contract decoder. */
static PyObject *
fields_list(const char *p, const char *end)
{
    Py_ssize_t n;
    if (!resp_int(&p, end, '*', &n) || n < 0)
        return PyList_New(0);
    PyObject *list = PyList_New(n);
    if (list == NULL)
        return NULL;
    for (Py_ssize_t k = 0; k < n; k++) {
        const char *data;
        Py_ssize_t len;
        PyObject *item = resp_bulk(&p, end, &data, &len) ? bytes_of(data, len) : NULL;
        if (item == NULL) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "an entry's fields are not bulk strings");
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, k, item);
    }
    return list;
}

/* export_reply(buffer, end, max_entry_bytes, max_io_elements)
 *   -> (rows, buffers, generation_nulls, skipped, skipped_items, ids)
 * The columns of a whole raw RESP2 XREADGROUP reply of one stream (``buffer[:end]``, a
 * writable buffer: the byte after each payload is overwritten with the NUL the parser
 * stops at), as export_columns gives them; ``skipped_items`` holds [id, fields] of each
 * skipped entry as redis-py would give them, ``ids`` every id read, space-separated. */
static PyObject *
export_reply(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    Py_ssize_t max_bytes, max_io;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError,
                        "export_reply(buffer, end, max_entry_bytes, max_io_elements)");
        return NULL;
    }
    if (limits_of(args + 2, &max_bytes, &max_io) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_WRITABLE) < 0)
        return NULL;
    Py_ssize_t end_at = PyLong_AsSsize_t(args[1]);
    PyObject *result = NULL, *columns = NULL, *items = NULL, *ids = NULL;
    const char **fields_at = NULL;
    Columns cols;
    memset(&cols, 0, sizeof cols);
    Buffer id_text = {0};
    if (end_at == -1 && PyErr_Occurred())
        goto finally;
    if (end_at < 0 || end_at > view.len) {
        PyErr_SetString(PyExc_ValueError, "export_reply: end out of range");
        goto finally;
    }
    char *base = view.buf;
    const char *p = base, *end = base + end_at, *name;
    Py_ssize_t n, streams, pair, name_len;
    if (!resp_int(&p, end, '*', &streams) || streams != 1 || !resp_int(&p, end, '*', &pair) ||
        pair != 2 || !resp_bulk(&p, end, &name, &name_len) || !resp_int(&p, end, '*', &n) ||
        n < 0) {
        PyErr_SetString(PyExc_ValueError, "not an XREADGROUP reply of one stream");
        goto finally;
    }
    if (columns_alloc(&cols, n, max_io) < 0)
        goto finally;
    fields_at = PyMem_RawMalloc((size_t)(n ? n : 1) * sizeof(char *));
    if (fields_at == NULL || buffer_grow(&id_text, n * 16 + 1) < 0) {
        PyErr_NoMemory();
        goto finally;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        const char *id, *value[6];
        Py_ssize_t id_len, value_len[6], count;
        if (!resp_int(&p, end, '*', &pair) || pair != 2 || !resp_bulk(&p, end, &id, &id_len)) {
            PyErr_SetString(PyExc_ValueError, "an entry of the reply is not [id, fields]");
            goto finally;
        }
        if (buffer_grow(&id_text, id_len + 1) < 0) {
            PyErr_NoMemory();
            goto finally;
        }
        if (i)
            id_text.data[id_text.len++] = ' ';
        memcpy(id_text.data + id_text.len, id, (size_t)id_len);
        id_text.len += id_len;
        fields_at[i] = p;
        if (!resp_int(&p, end, '*', &count)) {
            PyErr_SetString(PyExc_ValueError, "an entry's fields are not an array");
            goto finally;
        }
        for (Py_ssize_t k = 0; k < count; k++) {
            const char *data;
            Py_ssize_t len;
            if (!resp_bulk(&p, end, &data, &len)) {
                PyErr_SetString(PyExc_ValueError, "an entry's fields are not bulk strings");
                goto finally;
            }
            if (k < 6) {
                value[k] = data;
                value_len[k] = len;
            }
        }
        Entry *e = &cols.entries[i]; /* zeroed: payload NULL (skipped) unless shaped */
        e->id = id;
        e->id_len = id_len;
        if (contract_shape(e, count, value, value_len, max_bytes))
            base[value[5] - base + value_len[5]] = '\0'; /* was the CR after the payload */
    }
    if (p != end) {
        PyErr_SetString(PyExc_ValueError, "bytes after the XREADGROUP reply");
        goto finally;
    }
    columns = columns_build(&cols, n); /* the buffer is held by ``view`` */
    if (columns == NULL)
        goto finally;
    PyObject *skipped = PyTuple_GET_ITEM(columns, 3);
    Py_ssize_t nskipped = PyList_GET_SIZE(skipped);
    items = PyList_New(nskipped);
    if (items == NULL)
        goto finally;
    for (Py_ssize_t k = 0; k < nskipped; k++) {
        Py_ssize_t i = PyLong_AsSsize_t(PyList_GET_ITEM(skipped, k));
        PyObject *fields = fields_list(fields_at[i], end);
        PyObject *id = bytes_of(cols.entries[i].id, cols.entries[i].id_len);
        PyObject *item = (fields && id) ? PyList_New(2) : NULL;
        if (item == NULL) {
            Py_XDECREF(fields);
            Py_XDECREF(id);
            goto finally;
        }
        PyList_SET_ITEM(item, 0, id);
        PyList_SET_ITEM(item, 1, fields);
        PyList_SET_ITEM(items, k, item);
    }
    ids = bytes_of(id_text.data, id_text.len);
    if (ids == NULL)
        goto finally;
    result = Py_BuildValue("(OOOOOO)", PyTuple_GET_ITEM(columns, 0), PyTuple_GET_ITEM(columns, 1),
                           PyTuple_GET_ITEM(columns, 2), skipped, items, ids);
finally:
    Py_XDECREF(columns);
    Py_XDECREF(items);
    Py_XDECREF(ids);
    PyMem_RawFree(fields_at);
    buffer_free(&id_text);
    columns_free(&cols);
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef methods[] = {
    {"resp_scan", (PyCFunction)(void (*)(void))resp_scan, METH_FASTCALL,
     "resp_scan(buffer, end, pos, stack) -> (pos, stack or None once the reply is whole)."},
    {"export_reply", (PyCFunction)(void (*)(void))export_reply, METH_FASTCALL,
     "export_reply(buffer, end, max_entry_bytes, max_io_elements) -> (rows, buffers, "
     "generation_nulls, skipped, skipped_items, ids)."},
    {"export_columns", (PyCFunction)(void (*)(void))export_columns, METH_FASTCALL,
     "export_columns(items, max_entry_bytes, max_io_elements) -> (rows, buffers, "
     "generation_nulls, skipped)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_export_columns",
    "Arrow column buffers of the analytics export, built from raw stream entries.", -1,
    methods,
};

PyMODINIT_FUNC
PyInit__export_columns(void)
{
    c_locale = newlocale(LC_NUMERIC_MASK, "C", (locale_t)0);
    if (c_locale == (locale_t)0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyModule_Create(&module);
}
