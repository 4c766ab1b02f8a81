/* Native encoders for the attribute path: decoded attributes as JSON, and their COPY rows.
 *
 * The same rules as processor/core/attributes.py (decode_attributes, then the msgspec JSON
 * encoder of processor/core/jsonenc.py), written straight into a byte buffer: no
 * intermediate dict, no Python call per element except for the elements whose plan is a
 * compiled Python decoder (CALL). The output is byte-for-byte what the Python path writes;
 * tests/unit/test_attributes_native.py checks that on generated mappings and IO maps.
 *
 * A plan is a dict {io_id: (key, kind, arg)} built by attributes.native_plan():
 *   key   bytes, the JSON object key with its colon: b'"ignition":'
 *   kind  0 IDENTITY, 1 LABELS (arg: {raw value: JSON-encoded label}), 2 DIVIDE (arg: int
 *         divisor), 3 CALL (arg: the Python decoder)
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "../_cbuffer.h"

enum { IDENTITY = 0, LABELS = 1, DIVIDE = 2, CALL = 3 };

/* PostgreSQL timestamps count microseconds from 2000-01-01T00:00:00Z. */
#define PG_EPOCH_MS 946684800000LL
#define EXACT_DOUBLE (1LL << 53)

/* Room for ``extra`` more bytes in ``b``; -1 with MemoryError raised. */
static int
reserve(Buffer *b, Py_ssize_t extra)
{
    if (buffer_grow(b, extra) < 0) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static inline int
put(Buffer *b, const char *s, Py_ssize_t n)
{
    if (reserve(b, n) < 0)
        return -1;
    memcpy(b->data + b->len, s, (size_t)n);
    b->len += n;
    return 0;
}

static inline int
put_char(Buffer *b, char c)
{
    if (reserve(b, 1) < 0)
        return -1;
    b->data[b->len++] = c;
    return 0;
}

static inline void
be16(char *p, uint16_t v)
{
    p[0] = (char)(v >> 8);
    p[1] = (char)v;
}

static inline void
be32(char *p, uint32_t v)
{
    p[0] = (char)(v >> 24);
    p[1] = (char)(v >> 16);
    p[2] = (char)(v >> 8);
    p[3] = (char)v;
}

static inline void
be64(char *p, uint64_t v)
{
    be32(p, (uint32_t)(v >> 32));
    be32(p + 4, (uint32_t)v);
}

/* Decimal digits of v into the end of text[0..24), returning where they start. */
static char *
digits_of(unsigned long long v, char *end)
{
    do {
        *--end = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    return end;
}

static int
put_long_long(Buffer *b, long long v)
{
    char text[24];
    char *end = text + sizeof text;
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    char *start = digits_of(u, end);
    if (v < 0)
        *--start = '-';
    return put(b, start, end - start);
}

/* An integer as msgspec writes it (bool as true/false; beyond 64 bits, its digits). */
static int
put_int(Buffer *b, PyObject *v)
{
    if (PyBool_Check(v))
        return v == Py_True ? put(b, "true", 4) : put(b, "false", 5);
    int overflow = 0;
    long long n = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (n == -1 && PyErr_Occurred())
        return -1;
    if (!overflow)
        return put_long_long(b, n);
    if (overflow > 0) {
        unsigned long long u = PyLong_AsUnsignedLongLong(v);
        if (!(u == (unsigned long long)-1 && PyErr_Occurred())) {
            char text[24];
            char *start = digits_of(u, text + sizeof text);
            return put(b, start, text + sizeof text - start);
        }
        PyErr_Clear();
    }
    PyObject *digits = PyObject_Str(v);
    if (digits == NULL)
        return -1;
    Py_ssize_t len;
    const char *s = PyUnicode_AsUTF8AndSize(digits, &len);
    int rc = s == NULL ? -1 : put(b, s, len);
    Py_DECREF(digits);
    return rc;
}

/* A float as msgspec writes it: the shortest digits that read back as the same double
 * (repr's), in fixed notation from 1e-5 up to 1e16 ("12.0", "0.000015"), else as "1.5e16" /
 * "1e-7" (no '+', no leading zeros in the exponent); null for NaN and infinities. */
static int
put_float(Buffer *b, double d)
{
    if (!isfinite(d))
        return put(b, "null", 4);
    char *text = PyOS_double_to_string(d, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
    if (text == NULL)
        return -1;
    char *e = strchr(text, 'e');
    int rc;
    if (e == NULL) {
        rc = put(b, text, (Py_ssize_t)strlen(text));
    }
    else if (strcmp(e, "e-05") == 0) {
        /* repr switches to an exponent below 1e-4, msgspec below 1e-5: d.ddd e-05 is
         * written 0.0000dddd. */
        char *m = text;
        rc = 0;
        if (*m == '-') {
            rc = put_char(b, '-');
            m++;
        }
        if (rc == 0)
            rc = put(b, "0.0000", 6);
        for (; rc == 0 && m < e; m++)
            if (*m != '.')
                rc = put_char(b, *m);
    }
    else {
        char *digits = e + 1;
        int negative = *digits == '-';
        if (*digits == '+' || *digits == '-')
            digits++;
        while (*digits == '0' && digits[1] != '\0')
            digits++;
        rc = put(b, text, (Py_ssize_t)(e - text + 1));
        if (rc == 0 && negative)
            rc = put_char(b, '-');
        if (rc == 0)
            rc = put(b, digits, (Py_ssize_t)strlen(digits));
    }
    PyMem_Free(text);
    return rc;
}

static const long long POW10[] = {
    1LL, 10LL, 100LL, 1000LL, 10000LL, 100000LL, 1000000LL, 10000000LL, 100000000LL,
    1000000000LL, 10000000000LL, 100000000000LL, 1000000000000LL, 10000000000000LL,
    100000000000000LL, 1000000000000000LL,
};

/* n / 10^k written as put_float writes the double nearest to it, without converting:
 * with at most 15 significant digits the exact decimal is the shortest that reads back
 * as that double (doubles keep 15 decimal digits apart), so its digits are repr's.
 * Returns 1 when written, 0 when the value is outside that case. */
static int
put_decimal(Buffer *b, long long n, int k, int *rc)
{
    unsigned long long u = n < 0 ? 0ULL - (unsigned long long)n : (unsigned long long)n;
    /* fixed notation needs |n| / 10^k >= 1e-5, i.e. |n| >= 10^(k-5) */
    if (k < 1 || k > 15 || u >= 1000000000000000ULL ||
        (u != 0 && k > 5 && u < (unsigned long long)POW10[k - 5]))
        return 0;
    char text[48];
    char *end = text + sizeof text;
    unsigned long long whole = u / (unsigned long long)POW10[k];
    unsigned long long frac = u % (unsigned long long)POW10[k];
    char *p = end;
    int width = k;
    while (frac != 0 && frac % 10 == 0) { /* trailing zeros go */
        frac /= 10;
        width--;
    }
    if (frac == 0) {
        *--p = '0';
    }
    else {
        for (int i = 0; i < width; i++) {
            *--p = (char)('0' + frac % 10);
            frac /= 10;
        }
    }
    *--p = '.';
    p = digits_of(whole, p);
    if (n < 0)
        *--p = '-';
    *rc = put(b, p, end - p);
    return 1;
}

static const char HEX[] = "0123456789abcdef";

/* A str as a JSON string, escaped as msgspec escapes it (UTF-8 kept as is). */
static int
put_str(Buffer *b, PyObject *v)
{
    Py_ssize_t len;
    const char *s = PyUnicode_AsUTF8AndSize(v, &len);
    if (s == NULL)
        return -1;
    /* At most 6 bytes per input byte (\u00XX), plus the quotes. */
    if (reserve(b, len * 6 + 2) < 0)
        return -1;
    char *out = b->data + b->len;
    *out++ = '"';
    for (Py_ssize_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c != '"' && c != '\\') {
            *out++ = (char)c;
            continue;
        }
        *out++ = '\\';
        switch (c) {
        case '"': *out++ = '"'; break;
        case '\\': *out++ = '\\'; break;
        case '\b': *out++ = 'b'; break;
        case '\t': *out++ = 't'; break;
        case '\n': *out++ = 'n'; break;
        case '\f': *out++ = 'f'; break;
        case '\r': *out++ = 'r'; break;
        default:
            *out++ = 'u';
            *out++ = '0';
            *out++ = '0';
            *out++ = HEX[c >> 4];
            *out++ = HEX[c & 0xF];
        }
    }
    *out++ = '"';
    b->len = out - b->data;
    return 0;
}

/* Bytes as a JSON string of lowercase hex. */
static int
put_hex(Buffer *b, PyObject *v)
{
    Py_ssize_t len = PyBytes_GET_SIZE(v);
    const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(v);
    if (reserve(b, len * 2 + 2) < 0)
        return -1;
    char *out = b->data + b->len;
    *out++ = '"';
    for (Py_ssize_t i = 0; i < len; i++) {
        *out++ = HEX[s[i] >> 4];
        *out++ = HEX[s[i] & 0xF];
    }
    *out++ = '"';
    b->len = out - b->data;
    return 0;
}

/* A value a plan produced: int, float or str (what attributes.Attribute allows). */
static int
put_value(Buffer *b, PyObject *v)
{
    if (PyLong_Check(v))
        return put_int(b, v);
    if (PyFloat_Check(v))
        return put_float(b, PyFloat_AS_DOUBLE(v));
    if (PyUnicode_Check(v))
        return put_str(b, v);
    if (PyBytes_Check(v))
        return put_hex(b, v);
    PyErr_Format(PyExc_TypeError, "cannot encode an attribute of type %.100s",
                 Py_TYPE(v)->tp_name);
    return -1;
}

static int
put_divided(Buffer *b, PyObject *value, PyObject *divisor, int tens)
{
    int overflow = 0;
    long long n = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (n == -1 && PyErr_Occurred())
        return -1;
    int rc = 0;
    if (!overflow && tens > 0 && put_decimal(b, n, tens, &rc))
        return rc;
    long long d = PyLong_AsLongLong(divisor);
    if (d == -1 && PyErr_Occurred())
        PyErr_Clear();
    else if (!overflow && n <= EXACT_DOUBLE && n >= -EXACT_DOUBLE && d > 0 && d <= EXACT_DOUBLE)
        /* Both exact as doubles: one IEEE division is correctly rounded, as Python's. */
        return put_float(b, (double)n / (double)d);
    PyObject *quotient = PyNumber_TrueDivide(value, divisor);
    if (quotient == NULL)
        return -1;
    rc = put_value(b, quotient);
    Py_DECREF(quotient);
    return rc;
}

/* An IO id the mapping does not know: its number as the key. */
static int
put_raw_key(Buffer *b, PyObject *io_id)
{
    if (put_char(b, '"') < 0 || put_int(b, io_id) < 0)
        return -1;
    return put(b, "\":", 2);
}

/* A compiled plan: the plan dict's elements in an open-addressing table keyed by IO id,
 * with their kinds, divisors and small enum labels unpacked, so that an element costs no
 * dict lookup and no int conversion. It keeps the dict (which owns every object it
 * points to) alive. */
typedef struct {
    long io_id;
    int used;
    int kind;
    int tens;              /* DIVIDE by 10^tens (0: another divisor) */
    PyObject *key;         /* '"name":' */
    PyObject *arg;         /* the plan's argument: labels dict, divisor, decoder */
    PyObject **labels;     /* LABELS: labels[value] for values below n_labels, or NULL */
    Py_ssize_t n_labels;   /* 0: look labels up in the dict */
} Slot;

typedef struct {
    Slot *slots;
    size_t mask;
    PyObject *source;
} Compiled;

#define MAX_LABEL_INDEX 1024
static const char CAPSULE[] = "processor.core._speedups.plan";

static void
compiled_free(PyObject *capsule)
{
    Compiled *c = PyCapsule_GetPointer(capsule, CAPSULE);
    if (c == NULL)
        return;
    if (c->slots != NULL)
        for (size_t i = 0; i <= c->mask; i++)
            PyMem_Free(c->slots[i].labels);
    PyMem_Free(c->slots);
    Py_XDECREF(c->source);
    PyMem_Free(c);
}

static inline size_t
slot_of(const Compiled *c, long io_id)
{
    return ((size_t)io_id * 0x9E3779B97F4A7C15ULL >> 17) & c->mask;
}

static Slot *
find(const Compiled *c, long io_id)
{
    for (size_t i = slot_of(c, io_id);; i = (i + 1) & c->mask) {
        Slot *slot = &c->slots[i];
        if (!slot->used)
            return NULL;
        if (slot->io_id == io_id)
            return slot;
    }
}

/* Labels keyed by small non-negative values as an array (values are unsigned). */
static int
unpack_labels(Slot *slot)
{
    PyObject *key, *label;
    Py_ssize_t pos = 0;
    long top = -1;
    while (PyDict_Next(slot->arg, &pos, &key, &label)) {
        long value = PyLong_Check(key) ? PyLong_AsLong(key) : -1;
        if (value == -1 && PyErr_Occurred())
            PyErr_Clear();
        if (value >= MAX_LABEL_INDEX || !PyBytes_Check(label))
            return 0; /* stays a dict lookup */
        if (value > top)
            top = value;
    }
    slot->n_labels = top + 1;
    if (slot->n_labels == 0)
        return 0;
    slot->labels = PyMem_Calloc((size_t)slot->n_labels, sizeof(PyObject *));
    if (slot->labels == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    pos = 0;
    while (PyDict_Next(slot->arg, &pos, &key, &label)) {
        long value = PyLong_AsLong(key);
        if (value >= 0)
            slot->labels[value] = label;
    }
    return 0;
}

/* compile(plan: dict) -> capsule: the plan of native_plan() made ready for the encoder. */
static PyObject *
compile_plan(PyObject *module, PyObject *plan)
{
    (void)module;
    if (!PyDict_Check(plan)) {
        PyErr_SetString(PyExc_TypeError, "compile(plan): plan must be a dict");
        return NULL;
    }
    Compiled *c = PyMem_Calloc(1, sizeof(Compiled));
    if (c == NULL)
        return PyErr_NoMemory();
    size_t capacity = 8;
    while (capacity < (size_t)PyDict_GET_SIZE(plan) * 2)
        capacity *= 2;
    c->mask = capacity - 1;
    c->slots = PyMem_Calloc(capacity, sizeof(Slot));
    Py_INCREF(plan);
    c->source = plan;
    PyObject *capsule = c->slots == NULL ? NULL : PyCapsule_New(c, CAPSULE, compiled_free);
    if (capsule == NULL) {
        if (c->slots == NULL)
            PyErr_NoMemory();
        PyMem_Free(c->slots);
        Py_DECREF(plan);
        PyMem_Free(c);
        return NULL;
    }
    PyObject *io_id, *element;
    Py_ssize_t pos = 0;
    while (PyDict_Next(plan, &pos, &io_id, &element)) {
        long id = PyLong_Check(io_id) ? PyLong_AsLong(io_id) : -1;
        if (id == -1 && PyErr_Occurred())
            goto fail;
        if (!PyTuple_Check(element) || PyTuple_GET_SIZE(element) != 3 ||
            !PyBytes_Check(PyTuple_GET_ITEM(element, 0)) || !PyLong_Check(io_id) ||
            id == -1) {
            PyErr_SetString(PyExc_TypeError,
                            "a plan maps IO ids (non-negative) to (b'\"name\":', kind, arg)");
            goto fail;
        }
        long kind = PyLong_AsLong(PyTuple_GET_ITEM(element, 1));
        if (kind < IDENTITY || kind > CALL) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_ValueError, "unknown plan kind %ld", kind);
            goto fail;
        }
        size_t i = slot_of(c, id);
        while (c->slots[i].used)
            i = (i + 1) & c->mask;
        Slot *slot = &c->slots[i];
        slot->used = 1;
        slot->io_id = id;
        slot->kind = (int)kind;
        slot->key = PyTuple_GET_ITEM(element, 0);
        slot->arg = PyTuple_GET_ITEM(element, 2);
        if (kind == LABELS && (!PyDict_Check(slot->arg) || unpack_labels(slot) < 0)) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "LABELS takes a dict of labels");
            goto fail;
        }
        if (kind == DIVIDE) {
            long long d = PyLong_Check(slot->arg) ? PyLong_AsLongLong(slot->arg) : -1;
            if (d == -1 && PyErr_Occurred())
                PyErr_Clear();
            for (int k = 1; k <= 15 && d > 1; k++)
                if (d == POW10[k])
                    slot->tens = k;
        }
    }
    return capsule;
fail:
    Py_DECREF(capsule);
    return NULL;
}

static Compiled *
compiled_of(PyObject *plan)
{
    return PyCapsule_CheckExact(plan) ? PyCapsule_GetPointer(plan, CAPSULE) : NULL;
}

/* One IO element as its member "key":value at the end of the buffer. */
static int
put_member(Buffer *b, PyObject *io_id, PyObject *value, const Compiled *c)
{
    long id = PyLong_AsLong(io_id);
    if (id == -1 && PyErr_Occurred())
        PyErr_Clear(); /* not a plan's id: kept raw */
    Slot *slot = id == -1 ? NULL : find(c, id);
    if (slot == NULL) {
        if (put_raw_key(b, io_id) < 0)
            return -1;
        return PyBytes_Check(value) ? put_hex(b, value) : put_value(b, value);
    }
    if (put(b, PyBytes_AS_STRING(slot->key), PyBytes_GET_SIZE(slot->key)) < 0)
        return -1;
    if (slot->kind == CALL) {
        PyObject *decoded = PyObject_CallOneArg(slot->arg, value);
        if (decoded == NULL)
            return -1;
        int rc = put_value(b, decoded);
        Py_DECREF(decoded);
        return rc;
    }
    if (PyBytes_Check(value))
        return put_hex(b, value);
    if (slot->kind == IDENTITY)
        return put_value(b, value);
    if (slot->kind == LABELS) {
        PyObject *label;
        if (slot->n_labels > 0) {
            long raw = PyLong_Check(value) ? PyLong_AsLong(value) : -1;
            if (raw == -1 && PyErr_Occurred())
                PyErr_Clear();
            label = raw >= 0 && raw < slot->n_labels ? slot->labels[raw] : NULL;
        }
        else {
            label = PyDict_GetItemWithError(slot->arg, value);
            if (label == NULL && PyErr_Occurred())
                return -1;
        }
        if (label != NULL && PyBytes_Check(label))
            return put(b, PyBytes_AS_STRING(label), PyBytes_GET_SIZE(label));
        return put_value(b, value);
    }
    return put_divided(b, value, slot->arg, slot->tens);
}

/* The attributes JSON object of one IO map, appended to the buffer: one member per
 * element, in the map's order. */
static int
put_object(Buffer *b, PyObject *io, const Compiled *c)
{
    if (!PyDict_Check(io)) {
        PyErr_SetString(PyExc_TypeError, "io must be a dict");
        return -1;
    }
    if (put_char(b, '{') < 0)
        return -1;
    Py_ssize_t pos = 0;
    PyObject *io_id, *value;
    int first = 1;
    while (PyDict_Next(io, &pos, &io_id, &value)) {
        if ((!first && put_char(b, ',') < 0) || put_member(b, io_id, value, c) < 0)
            return -1;
        first = 0;
    }
    return put_char(b, '}');
}

static PyObject *
encode_attributes(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "encode_attributes(io, plan) takes 2 arguments");
        return NULL;
    }
    const Compiled *c = compiled_of(args[1]);
    if (c == NULL) {
        PyErr_SetString(PyExc_TypeError, "encode_attributes(io, plan): plan from compile()");
        return NULL;
    }
    Buffer b = {NULL, 0, 0};
    PyObject *out = NULL;
    if (put_object(&b, args[0], c) == 0)
        out = PyBytes_FromStringAndSize(b.data, b.len);
    buffer_free(&b);
    return out;
}

static PyObject *s_device_id, *s_ts, *s_io;

/* A record's device entry: (plan or Python encoder, mapping version, known), from
 * ``entries``, else from ``resolve(device_id)`` and then kept in ``entries``. */
static PyObject *
device_entry(PyObject *entries, PyObject *resolve, PyObject *device_id)
{
    PyObject *entry = PyDict_GetItemWithError(entries, device_id);
    if (entry != NULL) {
        Py_INCREF(entry);
        return entry;
    }
    if (PyErr_Occurred())
        return NULL;
    entry = PyObject_CallOneArg(resolve, device_id);
    if (entry != NULL && (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 3)) {
        PyErr_SetString(PyExc_TypeError, "resolve must return (plan, version, known)");
        Py_CLEAR(entry);
    }
    if (entry != NULL && PyDict_SetItem(entries, device_id, entry) < 0)
        Py_CLEAR(entry);
    return entry;
}

/* One record's attributes: its device id, ts, entry and IO map (new references). */
typedef struct {
    PyObject *device_id, *ts, *entry, *io;
} Fields;

static void
fields_clear(Fields *f)
{
    Py_CLEAR(f->device_id);
    Py_CLEAR(f->ts);
    Py_CLEAR(f->entry);
    Py_CLEAR(f->io);
}

static int
record_fields(PyObject *record, PyObject *entries, PyObject *resolve, Fields *f,
              long long *unknown)
{
    f->device_id = PyObject_GetAttr(record, s_device_id);
    if (f->device_id == NULL)
        return -1;
    f->entry = device_entry(entries, resolve, f->device_id);
    if (f->entry == NULL)
        return -1;
    int known = PyObject_IsTrue(PyTuple_GET_ITEM(f->entry, 2));
    if (known < 0)
        return -1;
    *unknown += !known;
    f->ts = PyObject_GetAttr(record, s_ts);
    if (f->ts == NULL)
        return -1;
    f->io = PyObject_GetAttr(record, s_io);
    return f->io == NULL ? -1 : 0;
}

/* The record's attributes JSON appended to the buffer: with the native plan of its entry,
 * or the bytes its Python encoder returns. */
static int
put_attributes(Buffer *b, Fields *f)
{
    PyObject *plan = PyTuple_GET_ITEM(f->entry, 0);
    const Compiled *c = compiled_of(plan);
    if (c != NULL)
        return put_object(b, f->io, c);
    PyObject *json = PyObject_CallOneArg(plan, f->io);
    if (json == NULL)
        return -1;
    int rc;
    if (PyBytes_Check(json)) {
        rc = put(b, PyBytes_AS_STRING(json), PyBytes_GET_SIZE(json));
    }
    else {
        PyErr_SetString(PyExc_TypeError, "an attributes encoder must return bytes");
        rc = -1;
    }
    Py_DECREF(json);
    return rc;
}

/* The records of a (records, entries: dict, resolve) call as a fast sequence. */
static PyObject *
records_argument(PyObject *const *args, Py_ssize_t nargs, const char *function)
{
    if (nargs != 3 || !PyDict_Check(args[1])) {
        PyErr_Format(PyExc_TypeError, "%s(records, entries: dict, resolve)", function);
        return NULL;
    }
    return PySequence_Fast(args[0], "records must be a sequence");
}

/* attribute_rows(records, entries, resolve) -> (rows, unknown)
 *
 * For each record, the row (device_id, ts, attributes JSON, mapping version) of
 * position_attributes; ``unknown`` counts the records of devices whose entry says they
 * are not in ``devices``.
 */
static PyObject *
attribute_rows(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    PyObject *records = records_argument(args, nargs, "attribute_rows");
    if (records == NULL)
        return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(records);
    PyObject **items = PySequence_Fast_ITEMS(records);
    PyObject *rows = PyList_New(count);
    Buffer b = {NULL, 0, 0};
    long long unknown = 0;
    if (rows == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < count; i++) {
        Fields f = {NULL, NULL, NULL, NULL};
        PyObject *row = NULL;
        b.len = 0;
        if (record_fields(items[i], args[1], args[2], &f, &unknown) == 0 &&
            put_attributes(&b, &f) == 0) {
            PyObject *json = PyBytes_FromStringAndSize(b.data, b.len);
            if (json != NULL) {
                row = PyTuple_Pack(4, f.device_id, f.ts, json, PyTuple_GET_ITEM(f.entry, 1));
                Py_DECREF(json);
            }
        }
        fields_clear(&f);
        if (row == NULL)
            goto fail;
        PyList_SET_ITEM(rows, i, row);
    }
    buffer_free(&b);
    Py_DECREF(records);
    return Py_BuildValue("(NL)", rows, unknown);
fail:
    buffer_free(&b);
    Py_XDECREF(rows);
    Py_DECREF(records);
    return NULL;
}

static const char COPY_HEADER[19] = "PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/* Bytes of a position_attributes row of binary COPY data beside its JSON: the field
 * count, then (length, value) for device_id, ts, attributes (json: its text) and
 * mapping_version. */
#define ROW_HEAD 30
#define ROW_OVERHEAD 38

/* A row's fields before its JSON at p (ROW_HEAD bytes; the JSON's length at p + 26). */
static void
row_head(char *p, long long device_id, long long ts)
{
    be16(p, 4);
    be32(p + 2, 8);
    be64(p + 6, (uint64_t)device_id);
    be32(p + 14, 8);
    be64(p + 18, (uint64_t)((ts - PG_EPOCH_MS) * 1000));
}

/* The row's last field after its JSON at p: mapping_version. */
static void
row_tail(char *p, int32_t version)
{
    be32(p, 4);
    be32(p + 4, (uint32_t)version);
}

static int
row_numbers(PyObject *device_id, PyObject *ts, PyObject *version, long long *d, long long *t,
            int32_t *v)
{
    *d = PyLong_AsLongLong(device_id);
    *t = PyLong_AsLongLong(ts);
    long value = PyLong_AsLong(version);
    if (PyErr_Occurred())
        return -1;
    if (value < INT32_MIN || value > INT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "mapping version out of int32 range");
        return -1;
    }
    *v = (int32_t)value;
    return 0;
}

/* attribute_copy_records(records, entries, resolve) -> (bytes, unknown)
 *
 * The binary COPY data of the records' position_attributes rows, each JSON written in
 * place (what attribute_copy(attribute_rows(...)[0]) gives, without a bytes object and a
 * tuple per record).
 */
static PyObject *
attribute_copy_records(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    PyObject *records = records_argument(args, nargs, "attribute_copy_records");
    if (records == NULL)
        return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(records);
    PyObject **items = PySequence_Fast_ITEMS(records);
    Buffer out = {NULL, 0, 0};
    long long unknown = 0;
    if (put(&out, COPY_HEADER, 19) < 0)
        goto fail;
    for (Py_ssize_t i = 0; i < count; i++) {
        Fields f = {NULL, NULL, NULL, NULL};
        long long device_id = 0, ts = 0;
        int32_t version = 0;
        Py_ssize_t head = out.len;
        int rc = record_fields(items[i], args[1], args[2], &f, &unknown);
        if (rc == 0)
            rc = row_numbers(f.device_id, f.ts, PyTuple_GET_ITEM(f.entry, 1), &device_id, &ts,
                             &version);
        if (rc == 0)
            rc = reserve(&out, ROW_HEAD);
        if (rc == 0) {
            out.len += ROW_HEAD;
            rc = put_attributes(&out, &f);
        }
        fields_clear(&f);
        Py_ssize_t len = out.len - head - ROW_HEAD;
        if (rc == 0 && len >= INT32_MAX) {
            PyErr_SetString(PyExc_OverflowError, "attributes too long");
            rc = -1;
        }
        if (rc == 0)
            rc = reserve(&out, ROW_OVERHEAD - ROW_HEAD);
        if (rc < 0)
            goto fail;
        row_head(out.data + head, device_id, ts);
        be32(out.data + head + 26, (uint32_t)len);
        row_tail(out.data + out.len, version);
        out.len += ROW_OVERHEAD - ROW_HEAD;
    }
    if (put(&out, "\xff\xff", 2) < 0)
        goto fail;
    PyObject *data = PyBytes_FromStringAndSize(out.data, out.len);
    buffer_free(&out);
    Py_DECREF(records);
    return data == NULL ? NULL : Py_BuildValue("(NL)", data, unknown);
fail:
    buffer_free(&out);
    Py_DECREF(records);
    return NULL;
}

/* attribute_copy(rows) -> bytes: PostgreSQL binary COPY data of position_attributes rows
 * (device_id bigint, ts timestamptz, attributes json, mapping_version integer) from
 * (device_id, ts ms, JSON bytes, version) tuples; what pgcopy.attribute_rows writes. */
static PyObject *
attribute_copy(PyObject *module, PyObject *rows_arg)
{
    (void)module;
    PyObject *rows = PySequence_Fast(rows_arg, "rows must be a sequence");
    if (rows == NULL)
        return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(rows);
    PyObject **items = PySequence_Fast_ITEMS(rows);
    /* The exact size first: 19 bytes of header and 2 of trailer, then the rows. */
    Py_ssize_t size = 19 + 2;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *row = items[i];
        if (!PyTuple_Check(row) || PyTuple_GET_SIZE(row) != 4 ||
            !PyBytes_Check(PyTuple_GET_ITEM(row, 2))) {
            PyErr_SetString(PyExc_TypeError, "a row must be (device_id, ts, bytes, version)");
            Py_DECREF(rows);
            return NULL;
        }
        Py_ssize_t len = PyBytes_GET_SIZE(PyTuple_GET_ITEM(row, 2));
        if (len >= INT32_MAX) {
            PyErr_SetString(PyExc_OverflowError, "attributes too long");
            Py_DECREF(rows);
            return NULL;
        }
        size += ROW_OVERHEAD + len;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, size);
    if (out == NULL) {
        Py_DECREF(rows);
        return NULL;
    }
    char *p = PyBytes_AS_STRING(out);
    memcpy(p, COPY_HEADER, 19);
    p += 19;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *row = items[i];
        long long device_id, ts;
        int32_t version;
        if (row_numbers(PyTuple_GET_ITEM(row, 0), PyTuple_GET_ITEM(row, 1),
                        PyTuple_GET_ITEM(row, 3), &device_id, &ts, &version) < 0) {
            Py_DECREF(out);
            Py_DECREF(rows);
            return NULL;
        }
        PyObject *json = PyTuple_GET_ITEM(row, 2);
        Py_ssize_t len = PyBytes_GET_SIZE(json);
        row_head(p, device_id, ts);
        be32(p + 26, (uint32_t)len);
        memcpy(p + ROW_HEAD, PyBytes_AS_STRING(json), (size_t)len);
        p += ROW_HEAD + len;
        row_tail(p, version);
        p += ROW_OVERHEAD - ROW_HEAD;
    }
    p[0] = p[1] = (char)0xff;
    Py_DECREF(rows);
    return out;
}

/* The next space-separated word of [*pp, end): its start and length; 0 when none is left. */
static int
next_word(const char **pp, const char *end, const char **word, Py_ssize_t *len)
{
    const char *p = *pp;
    while (p < end && *p == ' ')
        p++;
    if (p == end)
        return 0;
    const char *stop = memchr(p, ' ', (size_t)(end - p));
    *word = p;
    *len = (stop ? stop : end) - p;
    *pp = p + *len;
    return 1;
}

/* resp_bulks(text) -> (count, bytes): each space-separated word of ``text`` as a RESP
 * bulk string (``$<length>\r\n<word>\r\n``), for a command of many arguments (XACK of
 * a whole batch) packed without a Python call per argument. */
static PyObject *
resp_bulks(PyObject *module, PyObject *arg)
{
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "resp_bulks(text: bytes)");
        return NULL;
    }
    const char *text = PyBytes_AS_STRING(arg), *end = text + PyBytes_GET_SIZE(arg), *word;
    Py_ssize_t count = 0, size = 0, len;
    char header[32];
    for (const char *p = text; next_word(&p, end, &word, &len); count++)
        size += snprintf(header, sizeof header, "$%zd\r\n", len) + len + 2;
    PyObject *out = PyBytes_FromStringAndSize(NULL, size);
    if (out == NULL)
        return NULL;
    char *o = PyBytes_AS_STRING(out);
    for (const char *p = text; next_word(&p, end, &word, &len);) {
        int n = snprintf(header, sizeof header, "$%zd\r\n", len);
        memcpy(o, header, (size_t)n);
        memcpy(o + n, word, (size_t)len);
        o += n + len;
        *o++ = '\r';
        *o++ = '\n';
    }
    return Py_BuildValue("(nN)", count, out);
}

static PyMethodDef methods[] = {
    {"resp_bulks", resp_bulks, METH_O,
     "resp_bulks(text) -> (count, bytes): each space-separated word as a RESP bulk string."},
    {"encode_attributes", (PyCFunction)(void (*)(void))encode_attributes, METH_FASTCALL,
     "encode_attributes(io, plan) -> bytes: the attributes JSON of one record."},
    {"attribute_rows", (PyCFunction)(void (*)(void))attribute_rows, METH_FASTCALL,
     "attribute_rows(records, entries, resolve) -> (rows, unknown)."},
    {"compile", compile_plan, METH_O,
     "compile(plan) -> capsule: a native_plan() dict made ready for the encoder."},
    {"attribute_copy_records", (PyCFunction)(void (*)(void))attribute_copy_records,
     METH_FASTCALL, "attribute_copy_records(records, entries, resolve) -> (bytes, unknown)."},
    {"attribute_copy", attribute_copy, METH_O,
     "attribute_copy(rows) -> bytes: binary COPY data of position_attributes rows."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "processor.core._speedups",
    "Native encoders for the attribute path (see attributes.py).", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    s_device_id = PyUnicode_InternFromString("device_id");
    s_ts = PyUnicode_InternFromString("ts");
    s_io = PyUnicode_InternFromString("io");
    if (s_device_id == NULL || s_ts == NULL || s_io == NULL)
        return NULL;
    return PyModule_Create(&module);
}
