/*
 * dst._inline: a node's inline form (dst.device: read_now / write_now on a file)
 * for a whole run of requests in one call, compiled.
 *
 * Python's floor of an NBD server stays below a C server on small writes (see
 * docs/benchmarks.md): the parse -> pwrite -> reply loop is the one place where that
 * matters, so this module does exactly that loop and nothing else.  It is an
 * optimisation of dst.nbd.requests.RequestParser.requests with an ``inline`` device,
 * never a second set of semantics: it serves a request only when the pure-Python
 * inline path would serve it the same way (a valid READ or plain WRITE, no flags,
 * in range, whole in the buffer, a READ within the budget) and stops at the first one
 * it does not take -- or whose system call fails or comes up short -- leaving that one
 * and everything after it to Python, which answers it (and reports any error) as it
 * always did.  Without a C compiler the package installs without it and the Python
 * path serves alone.
 *
 * Inline(fd, size, max_block, structured, writable, sink)(buf, pos, end, budget)
 *   -> (pos, used): serves the requests in buf[pos:end] from pos on; pos is where it
 *   stopped, used the bytes of READ data served (charged to the budget by the caller).
 *   The replies of the run, concatenated (headers and READ data), go to sink(bytes)
 *   once.  The system calls run without the GIL (the receive buffer stays exported,
 *   so it cannot be resized meanwhile).  close(): the file's owner closes the
 *   descriptor; nothing is taken after it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#define REQ_SIZE 28
#define REQUEST_MAGIC 0x25609513u
#define SIMPLE_MAGIC 0x67446698u
#define CHUNK_MAGIC 0x668e33efu
#define CMD_READ 0
#define CMD_WRITE 1
#define SIMPLE_HEAD 16
#define DATA_HEAD 28 /* structured OFFSET_DATA chunk header, offset included */
#define REPLY_DONE 1
#define TYPE_OFFSET_DATA 1

static uint16_t get16(const unsigned char *p) { return (uint16_t)(p[0] << 8 | p[1]); }

static uint32_t get32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint64_t get64(const unsigned char *p) {
    return (uint64_t)get32(p) << 32 | get32(p + 4);
}

static void put16(unsigned char *p, uint16_t v) {
    p[0] = (unsigned char)(v >> 8);
    p[1] = (unsigned char)v;
}

static void put32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

static void put64(unsigned char *p, uint64_t v) {
    put32(p, (uint32_t)(v >> 32));
    put32(p + 4, (uint32_t)v);
}

/* All of it, or -1 (an error, or the end of the file before it). */
static int pread_all(int fd, unsigned char *to, size_t n, uint64_t offset) {
    while (n) {
        ssize_t got = pread(fd, to, n, (off_t)offset);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            return -1;
        to += got;
        n -= (size_t)got;
        offset += (uint64_t)got;
    }
    return 0;
}

static int pwrite_all(int fd, const unsigned char *from, size_t n, uint64_t offset) {
    while (n) {
        ssize_t put = pwrite(fd, from, n, (off_t)offset);
        if (put < 0 && errno == EINTR)
            continue;
        if (put <= 0)
            return -1;
        from += put;
        n -= (size_t)put;
        offset += (uint64_t)put;
    }
    return 0;
}

typedef struct {
    PyObject_HEAD
    int fd;
    uint64_t size;
    uint32_t max_block;
    int structured;
    int writable;
    PyObject *sink;
    PyObject *weakrefs; /* its owner holds it weakly, to close it */
    vectorcallfunc vectorcall;
} Inline;

/* A request this module takes (see the top): its length, else -1. */
static long long takes(const Inline *self, const unsigned char *h) {
    if (get32(h) != REQUEST_MAGIC || get16(h + 4) != 0)
        return -1;
    uint16_t typ = get16(h + 6);
    uint64_t offset = get64(h + 16);
    uint32_t length = get32(h + 24);
    if (length == 0 || length > self->max_block || offset > self->size ||
        length > self->size - offset)
        return -1;
    if (typ == CMD_READ || (typ == CMD_WRITE && self->writable))
        return length;
    return -1;
}

/* (pos, used) */
static PyObject *result(Py_ssize_t pos, Py_ssize_t used) {
    PyObject *p = PyLong_FromSsize_t(pos);
    PyObject *u = p == NULL ? NULL : PyLong_FromSsize_t(used);
    PyObject *r = u == NULL ? NULL : PyTuple_Pack(2, p, u);
    Py_XDECREF(p);
    Py_XDECREF(u);
    return r;
}

/* Called per receive: vectorcall, no argument tuple. */
static PyObject *Inline_vectorcall(PyObject *op, PyObject *const *args, size_t nargsf,
                                   PyObject *kwnames) {
    Inline *self = (Inline *)op;
    if (PyVectorcall_NARGS(nargsf) != 4 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames))) {
        PyErr_SetString(PyExc_TypeError, "Inline takes (buffer, pos, end, budget)");
        return NULL;
    }
    PyObject *bufobj = args[0];
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    Py_ssize_t end = PyLong_AsSsize_t(args[2]);
    Py_ssize_t budget = PyLong_AsSsize_t(args[3]);
    if ((pos == -1 || end == -1 || budget == -1) && PyErr_Occurred())
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(bufobj, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (pos < 0 || end < pos || end > view.len) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "pos and end must lie within the buffer");
        return NULL;
    }
    if (self->fd < 0) { /* closed */
        PyBuffer_Release(&view);
        return result(pos, 0);
    }
    const unsigned char *buf = view.buf;
    const size_t head = self->structured ? DATA_HEAD : SIMPLE_HEAD;

    /* What this call takes, and the size of its replies. */
    Py_ssize_t p = pos, total = 0, left = budget;
    Py_ssize_t count = 0;
    while (p + REQ_SIZE <= end) {
        const unsigned char *h = buf + p;
        long long length = takes(self, h);
        if (length < 0)
            break;
        if (get16(h + 6) == CMD_WRITE) {
            if (length > end - p - REQ_SIZE)
                break; /* its payload is not all here */
            total += SIMPLE_HEAD;
            p += REQ_SIZE + (Py_ssize_t)length;
        } else {
            if (length > left)
                break; /* over the budget: the caller decides */
            left -= (Py_ssize_t)length;
            total += (Py_ssize_t)(head + (size_t)length);
            p += REQ_SIZE;
        }
        count++;
    }
    if (!count) {
        PyBuffer_Release(&view);
        return result(pos, 0);
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, total);
    if (out == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    unsigned char *o = (unsigned char *)PyBytes_AS_STRING(out);
    Py_ssize_t filled = 0, used = 0;
    const int fd = self->fd;
    p = pos;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < count; i++) {
        const unsigned char *h = buf + p;
        uint32_t length = get32(h + 24);
        uint64_t offset = get64(h + 16);
        if (get16(h + 6) == CMD_WRITE) {
            if (pwrite_all(fd, h + REQ_SIZE, length, offset) < 0)
                break; /* Python writes it again and answers the error */
            put32(o + filled, SIMPLE_MAGIC);
            put32(o + filled + 4, 0);
            memcpy(o + filled + 8, h + 8, 8); /* the handle, as it came */
            filled += SIMPLE_HEAD;
            p += REQ_SIZE + length;
            continue;
        }
        if (pread_all(fd, o + filled + head, length, offset) < 0)
            break; /* Python reads it again and answers the error */
        if (self->structured) {
            put32(o + filled, CHUNK_MAGIC);
            put16(o + filled + 4, REPLY_DONE);
            put16(o + filled + 6, TYPE_OFFSET_DATA);
            memcpy(o + filled + 8, h + 8, 8);
            put32(o + filled + 16, 8 + length);
            put64(o + filled + 20, offset);
        } else {
            put32(o + filled, SIMPLE_MAGIC);
            put32(o + filled + 4, 0);
            memcpy(o + filled + 8, h + 8, 8);
        }
        filled += (Py_ssize_t)(head + length);
        used += length;
        p += REQ_SIZE;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    if (filled == 0) {
        Py_DECREF(out);
        return result(pos, 0);
    }
    if (filled < total && _PyBytes_Resize(&out, filled) < 0)
        return NULL;
    PyObject *r = PyObject_CallOneArg(self->sink, out);
    Py_DECREF(out);
    if (r == NULL)
        return NULL;
    Py_DECREF(r);
    return result(p, used);
}

static PyObject *Inline_close(PyObject *op, PyObject *unused) {
    (void)unused;
    ((Inline *)op)->fd = -1;
    Py_RETURN_NONE;
}

static PyMethodDef Inline_methods[] = {
    {"close", Inline_close, METH_NOARGS,
     "The descriptor is closing: take nothing from now on (Python answers)."},
    {NULL, NULL, 0, NULL},
};

static int Inline_init(PyObject *op, PyObject *args, PyObject *kwargs) {
    Inline *self = (Inline *)op;
    static char *names[] = {"fd", "size", "max_block", "structured", "writable", "sink", NULL};
    int fd, structured, writable;
    unsigned long long size;
    unsigned int max_block;
    PyObject *sink;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iKIppO", names, &fd, &size, &max_block,
                                     &structured, &writable, &sink))
        return -1;
    if (fd < 0) {
        PyErr_SetString(PyExc_ValueError, "fd must be an open descriptor");
        return -1;
    }
    if (!PyCallable_Check(sink)) {
        PyErr_SetString(PyExc_TypeError, "sink must be callable");
        return -1;
    }
    self->vectorcall = Inline_vectorcall;
    self->fd = fd;
    self->size = size;
    self->max_block = max_block;
    self->structured = structured;
    self->writable = writable;
    Py_INCREF(sink);
    Py_XSETREF(self->sink, sink);
    return 0;
}

static int Inline_traverse(PyObject *op, visitproc visit, void *arg) {
    Py_VISIT(((Inline *)op)->sink);
    return 0;
}

static int Inline_clear(PyObject *op) {
    Py_CLEAR(((Inline *)op)->sink);
    return 0;
}

static void Inline_dealloc(PyObject *op) {
    PyObject_GC_UnTrack(op);
    if (((Inline *)op)->weakrefs != NULL)
        PyObject_ClearWeakRefs(op);
    Inline_clear(op);
    Py_TYPE(op)->tp_free(op);
}

static PyTypeObject InlineType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "dst._inline.Inline",
    .tp_basicsize = sizeof(Inline),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(Inline, vectorcall),
    .tp_weaklistoffset = offsetof(Inline, weakrefs),
    .tp_doc = "Inline(fd, size, max_block, structured, writable, sink): serves runs of "
              "READs and plain WRITEs on a file (module docstring).",
    .tp_new = PyType_GenericNew,
    .tp_init = Inline_init,
    .tp_call = PyVectorcall_Call,
    .tp_methods = Inline_methods,
    .tp_traverse = Inline_traverse,
    .tp_clear = Inline_clear,
    .tp_dealloc = Inline_dealloc,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "dst._inline",
    .m_doc = "A node's inline form for runs of requests, compiled (see the source).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__inline(void) {
    if (PyType_Ready(&InlineType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&InlineType);
    if (PyModule_AddObject(m, "Inline", (PyObject *)&InlineType) < 0) {
        Py_DECREF(&InlineType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
