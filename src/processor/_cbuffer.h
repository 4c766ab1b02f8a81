/* A growable byte buffer shared by the package's C extensions.
 *
 * It uses the raw allocator, so it may grow while the GIL is released (the export's
 * column builder parses without it); buffer_grow sets no exception: a caller holding the
 * GIL raises MemoryError itself when it fails. */
#ifndef PROCESSOR_CBUFFER_H
#define PROCESSOR_CBUFFER_H

#include <Python.h>
#include <string.h>

typedef struct {
    char *data;
    Py_ssize_t len;
    Py_ssize_t cap;
} Buffer;

/* Room for ``extra`` more bytes: 0, or -1 when memory ran out (no exception set). */
static int
buffer_grow(Buffer *b, Py_ssize_t extra)
{
    if (b->len + extra <= b->cap)
        return 0;
    Py_ssize_t cap = b->cap ? b->cap : 1024;
    while (cap < b->len + extra)
        cap *= 2;
    char *data = PyMem_RawRealloc(b->data, (size_t)cap);
    if (data == NULL)
        return -1;
    b->data = data;
    b->cap = cap;
    return 0;
}

static inline void
buffer_free(Buffer *b)
{
    PyMem_RawFree(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

#endif
