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

enum { IDENTITY = 0, LABELS = 1, DIVIDE = 2, CALL = 3 };

/* PostgreSQL timestamps count microseconds from 2000-01-01T00:00:00Z. */
#define PG_EPOCH_MS 946684800000LL
#define EXACT_DOUBLE (1LL << 53)

typedef struct {
    char *data;
    Py_ssize_t len;
    Py_ssize_t cap;
} Buffer;

static int
reserve(Buffer *b, Py_ssize_t extra)
{
    if (b->len + extra <= b->cap)
        return 0;
    Py_ssize_t cap = b->cap ? b->cap : 1024;
    while (cap < b->len + extra)
        cap *= 2;
    char *data = PyMem_Realloc(b->data, (size_t)cap);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->data = data;
    b->cap = cap;
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

/* n / 10^k written as put_float writes the double nearest to it, without converting:
 * with at most 15 significant digits the exact decimal is the shortest that reads back
 * as that double (doubles keep 15 decimal digits apart), so its digits are repr's.
 * Returns 1 when written, 0 when the value is outside that case. */
static int
put_decimal(Buffer *b, long long n, int k, int *rc)
{
    static const long long pow10[] = {
        1LL, 10LL, 100LL, 1000LL, 10000LL, 100000LL, 1000000LL, 10000000LL, 100000000LL,
        1000000000LL, 10000000000LL, 100000000000LL, 1000000000000LL, 10000000000000LL,
        100000000000000LL, 1000000000000000LL,
    };
    unsigned long long u = n < 0 ? 0ULL - (unsigned long long)n : (unsigned long long)n;
    /* fixed notation needs |n| / 10^k >= 1e-5, i.e. |n| * 10^5 >= 10^k */
    if (k < 1 || k > 15 || u >= 1000000000000000ULL || (u != 0 && u * 100000ULL < (unsigned long long)pow10[k]))
        return 0;
    char text[48];
    char *end = text + sizeof text;
    unsigned long long whole = u / (unsigned long long)pow10[k];
    unsigned long long frac = u % (unsigned long long)pow10[k];
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
put_divided(Buffer *b, PyObject *value, PyObject *divisor)
{
    int overflow = 0;
    long long n = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (n == -1 && PyErr_Occurred())
        return -1;
    long long d = PyLong_AsLongLong(divisor);
    if (d == -1 && PyErr_Occurred()) {
        PyErr_Clear();
    }
    else if (!overflow && d > 1) {
        int k = 0, rc = 0;
        long long t = d;
        while (t % 10 == 0) {
            t /= 10;
            k++;
        }
        if (t == 1 && put_decimal(b, n, k, &rc))
            return rc;
    }
    if (!overflow && n <= EXACT_DOUBLE && n >= -EXACT_DOUBLE && d > 0 && d <= EXACT_DOUBLE)
        /* Both exact as doubles: one IEEE division is correctly rounded, as Python's. */
        return put_float(b, (double)n / (double)d);
    PyObject *quotient = PyNumber_TrueDivide(value, divisor);
    if (quotient == NULL)
        return -1;
    int rc = put_value(b, quotient);
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

typedef struct {
    Py_ssize_t start; /* of the member's text in the scratch buffer: "key":value */
    Py_ssize_t key_len; /* of the key between its quotes */
    Py_ssize_t len;
} Member;

/* The order jsonb keeps object keys in: shorter first, then bytewise. Members written in
 * it spare PostgreSQL's sort of every stored object (its sort checks for sorted input). */
static inline int
member_before(const char *text, const Member *a, const Member *b)
{
    if (a->key_len != b->key_len)
        return a->key_len < b->key_len;
    return memcmp(text + a->start + 1, text + b->start + 1, (size_t)a->key_len) < 0;
}

/* One IO element as its member "key":value at the end of the buffer. */
static int
put_member(Buffer *b, PyObject *io_id, PyObject *value, PyObject *plan, Member *m)
{
    m->start = b->len;
    PyObject *element = PyDict_GetItemWithError(plan, io_id);
    if (element == NULL) {
        if (PyErr_Occurred() || put_raw_key(b, io_id) < 0)
            return -1;
        m->key_len = b->len - m->start - 3;
        return PyBytes_Check(value) ? put_hex(b, value) : put_value(b, value);
    }
    if (!PyTuple_Check(element) || PyTuple_GET_SIZE(element) != 3) {
        PyErr_SetString(PyExc_TypeError, "a plan element must be (key, kind, arg)");
        return -1;
    }
    PyObject *key = PyTuple_GET_ITEM(element, 0);
    long kind = PyLong_AsLong(PyTuple_GET_ITEM(element, 1));
    PyObject *arg = PyTuple_GET_ITEM(element, 2);
    if (!PyBytes_Check(key) || PyBytes_GET_SIZE(key) < 3) {
        PyErr_SetString(PyExc_TypeError, "a plan key must be bytes: '\"name\":'");
        return -1;
    }
    if (put(b, PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key)) < 0)
        return -1;
    m->key_len = PyBytes_GET_SIZE(key) - 3;
    if (kind == CALL) {
        PyObject *decoded = PyObject_CallOneArg(arg, value);
        if (decoded == NULL)
            return -1;
        int rc = put_value(b, decoded);
        Py_DECREF(decoded);
        return rc;
    }
    if (PyBytes_Check(value))
        return put_hex(b, value);
    if (kind == IDENTITY)
        return put_value(b, value);
    if (kind == LABELS) {
        PyObject *label = PyDict_GetItemWithError(arg, value);
        if (label != NULL && PyBytes_Check(label))
            return put(b, PyBytes_AS_STRING(label), PyBytes_GET_SIZE(label));
        return PyErr_Occurred() ? -1 : put_value(b, value);
    }
    if (kind == DIVIDE)
        return put_divided(b, value, arg);
    PyErr_Format(PyExc_ValueError, "unknown plan kind %ld", kind);
    return -1;
}

/* An IO map's members, written into scratch space and ordered as jsonb orders keys. */
typedef struct {
    Buffer text; /* the members' text, reused across records */
    Member *members;
    Py_ssize_t capacity;
    Py_ssize_t count;
    Py_ssize_t size; /* of the object: braces, members and commas */
} Object;

static void
object_free(Object *o)
{
    PyMem_Free(o->text.data);
    PyMem_Free(o->members);
}

static int
collect(Object *o, PyObject *io, PyObject *plan)
{
    if (!PyDict_Check(io) || !PyDict_Check(plan)) {
        PyErr_SetString(PyExc_TypeError, "io and plan must be dicts");
        return -1;
    }
    Py_ssize_t count = PyDict_GET_SIZE(io);
    if (count > o->capacity) {
        Member *members = PyMem_Realloc(o->members, sizeof(Member) * (size_t)count);
        if (members == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        o->members = members;
        o->capacity = count;
    }
    Buffer *b = &o->text;
    Member *members = o->members;
    Py_ssize_t pos = 0, n = 0, size = 2;
    PyObject *io_id, *value;
    b->len = 0;
    while (n < count && PyDict_Next(io, &pos, &io_id, &value)) {
        Member current;
        if (put_member(b, io_id, value, plan, &current) < 0)
            return -1;
        current.len = b->len - current.start;
        size += current.len + (n > 0);
        /* insertion sort: devices send their elements in a stable order, so few moves */
        Py_ssize_t j = n;
        while (j > 0 && member_before(b->data, &current, &members[j - 1])) {
            members[j] = members[j - 1];
            j--;
        }
        members[j] = current;
        n++;
    }
    o->count = n;
    o->size = size;
    return 0;
}

/* The collected object's text at p (o->size bytes). */
static void
emit(const Object *o, char *p)
{
    *p++ = '{';
    for (Py_ssize_t i = 0; i < o->count; i++) {
        const Member *m = &o->members[i];
        if (i > 0)
            *p++ = ',';
        memcpy(p, o->text.data + m->start, (size_t)m->len);
        p += m->len;
    }
    *p = '}';
}

/* The attributes JSON object of one IO map, members in jsonb key order. */
static PyObject *
encode_object(Object *o, PyObject *io, PyObject *plan)
{
    if (collect(o, io, plan) < 0)
        return NULL;
    PyObject *out = PyBytes_FromStringAndSize(NULL, o->size);
    if (out != NULL)
        emit(o, PyBytes_AS_STRING(out));
    return out;
}

static PyObject *
encode_attributes(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "encode_attributes(io, plan) takes 2 arguments");
        return NULL;
    }
    Object o = {{NULL, 0, 0}, NULL, 0, 0, 0};
    PyObject *out = encode_object(&o, args[0], args[1]);
    object_free(&o);
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

/* One record's attributes: its device id, ts and entry (new references), and either the
 * object collected in ``o`` (*json NULL) or the bytes a Python encoder made (*json). */
typedef struct {
    PyObject *device_id, *ts, *entry, *json;
} Encoded;

static void
encoded_clear(Encoded *e)
{
    Py_CLEAR(e->device_id);
    Py_CLEAR(e->ts);
    Py_CLEAR(e->entry);
    Py_CLEAR(e->json);
}

static int
encode_record(Object *o, PyObject *record, PyObject *entries, PyObject *resolve, Encoded *e,
              long long *unknown)
{
    PyObject *io = NULL;
    e->device_id = PyObject_GetAttr(record, s_device_id);
    if (e->device_id == NULL)
        return -1;
    e->entry = device_entry(entries, resolve, e->device_id);
    if (e->entry == NULL)
        return -1;
    int known = PyObject_IsTrue(PyTuple_GET_ITEM(e->entry, 2));
    if (known < 0)
        return -1;
    *unknown += !known;
    e->ts = PyObject_GetAttr(record, s_ts);
    if (e->ts == NULL || (io = PyObject_GetAttr(record, s_io)) == NULL)
        return -1;
    PyObject *plan = PyTuple_GET_ITEM(e->entry, 0);
    int rc = 0;
    if (PyDict_Check(plan)) {
        rc = collect(o, io, plan);
    }
    else {
        e->json = PyObject_CallOneArg(plan, io);
        if (e->json != NULL && !PyBytes_Check(e->json)) {
            PyErr_SetString(PyExc_TypeError, "an attributes encoder must return bytes");
            rc = -1;
        }
        else if (e->json == NULL) {
            rc = -1;
        }
    }
    Py_DECREF(io);
    return rc;
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
    if (nargs != 3 || !PyDict_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "attribute_rows(records, entries: dict, resolve)");
        return NULL;
    }
    PyObject *records = PySequence_Fast(args[0], "records must be a sequence");
    if (records == NULL)
        return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(records);
    PyObject **items = PySequence_Fast_ITEMS(records);
    PyObject *rows = PyList_New(count);
    Object o = {{NULL, 0, 0}, NULL, 0, 0, 0};
    long long unknown = 0;
    if (rows == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < count; i++) {
        Encoded e = {NULL, NULL, NULL, NULL};
        if (encode_record(&o, items[i], args[1], args[2], &e, &unknown) < 0) {
            encoded_clear(&e);
            goto fail;
        }
        if (e.json == NULL) {
            e.json = PyBytes_FromStringAndSize(NULL, o.size);
            if (e.json != NULL)
                emit(&o, PyBytes_AS_STRING(e.json));
        }
        PyObject *row = e.json == NULL
                            ? NULL
                            : PyTuple_Pack(4, e.device_id, e.ts, e.json,
                                           PyTuple_GET_ITEM(e.entry, 1));
        encoded_clear(&e);
        if (row == NULL)
            goto fail;
        PyList_SET_ITEM(rows, i, row);
    }
    object_free(&o);
    Py_DECREF(records);
    return Py_BuildValue("(NL)", rows, unknown);
fail:
    object_free(&o);
    Py_XDECREF(rows);
    Py_DECREF(records);
    return NULL;
}

static const char COPY_HEADER[19] = "PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/* One position_attributes row of binary COPY data at p: 39 bytes beside its JSON. */
static char *
copy_row(char *p, long long device_id, long long ts, Py_ssize_t len, int32_t version)
{
    be16(p, 4);
    be32(p + 2, 8);
    be64(p + 6, (uint64_t)device_id);
    be32(p + 14, 8);
    be64(p + 18, (uint64_t)((ts - PG_EPOCH_MS) * 1000));
    be32(p + 26, (uint32_t)(len + 1));
    p[30] = 1; /* jsonb binary format version */
    be32(p + 31 + len, 4);
    be32(p + 35 + len, (uint32_t)version);
    return p + 31;
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
 * The binary COPY data of the records' position_attributes rows, written straight from
 * their IO maps (what attribute_copy(attribute_rows(...)[0]) gives, without a bytes
 * object and a tuple per record).
 */
static PyObject *
attribute_copy_records(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 3 || !PyDict_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError,
                        "attribute_copy_records(records, entries: dict, resolve)");
        return NULL;
    }
    PyObject *records = PySequence_Fast(args[0], "records must be a sequence");
    if (records == NULL)
        return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(records);
    PyObject **items = PySequence_Fast_ITEMS(records);
    Object o = {{NULL, 0, 0}, NULL, 0, 0, 0};
    Buffer out = {NULL, 0, 0};
    long long unknown = 0;
    if (put(&out, COPY_HEADER, 19) < 0)
        goto fail;
    for (Py_ssize_t i = 0; i < count; i++) {
        Encoded e = {NULL, NULL, NULL, NULL};
        long long device_id, ts;
        int32_t version;
        if (encode_record(&o, items[i], args[1], args[2], &e, &unknown) < 0 ||
            row_numbers(e.device_id, e.ts, PyTuple_GET_ITEM(e.entry, 1), &device_id, &ts,
                        &version) < 0) {
            encoded_clear(&e);
            goto fail;
        }
        Py_ssize_t len = e.json == NULL ? o.size : PyBytes_GET_SIZE(e.json);
        if (len >= INT32_MAX || reserve(&out, 39 + len) < 0) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_OverflowError, "attributes too long");
            encoded_clear(&e);
            goto fail;
        }
        char *p = copy_row(out.data + out.len, device_id, ts, len, version);
        if (e.json == NULL)
            emit(&o, p);
        else
            memcpy(p, PyBytes_AS_STRING(e.json), (size_t)len);
        out.len += 39 + len;
        encoded_clear(&e);
    }
    if (put(&out, "\xff\xff", 2) < 0)
        goto fail;
    PyObject *data = PyBytes_FromStringAndSize(out.data, out.len);
    object_free(&o);
    PyMem_Free(out.data);
    Py_DECREF(records);
    return data == NULL ? NULL : Py_BuildValue("(NL)", data, unknown);
fail:
    object_free(&o);
    PyMem_Free(out.data);
    Py_DECREF(records);
    return NULL;
}

/* attribute_copy(rows) -> bytes: PostgreSQL binary COPY data of position_attributes rows
 * (device_id bigint, ts timestamptz, attributes jsonb, mapping_version integer) from
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
    /* The exact size first: 19 bytes of header, 2 of trailer, 39 a row beside its JSON. */
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
        size += 39 + len;
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
        p = copy_row(p, device_id, ts, len, version);
        memcpy(p, PyBytes_AS_STRING(json), (size_t)len);
        p += len + 8;
    }
    p[0] = p[1] = (char)0xff;
    Py_DECREF(rows);
    return out;
}

static PyMethodDef methods[] = {
    {"encode_attributes", (PyCFunction)(void (*)(void))encode_attributes, METH_FASTCALL,
     "encode_attributes(io, plan) -> bytes: the attributes JSON of one record."},
    {"attribute_rows", (PyCFunction)(void (*)(void))attribute_rows, METH_FASTCALL,
     "attribute_rows(records, entries, resolve) -> (rows, unknown)."},
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
