/* lookupd's compiled front end: accept, read, answer from a table Python fills, close.
 *
 * One call per wake-up of the listening socket (lookupd/fastpath.py). For each waiting
 * client it accepts, reads what the client has already sent (Exim writes its request right
 * after connecting, then half-closes) and, when the whole request is there and the table
 * holds a reply for exactly those bytes that has not expired, writes it and closes: no Python
 * object lives longer than the lookup. Every other client (a request not all there, one the
 * table does not hold, an expired reply) is handed back to Python with what was read, to be
 * answered by the dispatcher as before. Python decides what goes in the table and when it
 * is emptied; this file only counts the hits (each entry's third item).
 *
 * table: dict, request bytes -> [reply bytes, expires (time.time() scale), hits (int),
 *                                 seconds spent on those hits (float)]
 *
 * Built against the stable ABI of Python 3.11 (abi3): the same file runs on every later
 * Python, so a dist-upgrade of python3 keeps the front end (and the Debian package needs no
 * rebuild for it).
 */
#define PY_SSIZE_T_CLEAN
#define Py_LIMITED_API 0x030B0000
#include <Python.h>

#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define READ_SIZE 4096

/* The whole request: up to and including its first newline, or all of it at EOF.
 * Returns its length, 0 while incomplete. */
static Py_ssize_t request_length(const char *buf, Py_ssize_t n, int eof)
{
    const char *nl = memchr(buf, '\n', (size_t)n);
    if (nl != NULL)
        return (nl - buf) + 1;
    return eof ? n : 0;
}

/* A hit: write the kept reply, close, count. 1 when answered, 0 when Python must answer. */
static double monotonic(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int answer_from(PyObject *table, int fd, const char *req, Py_ssize_t len, double now,
                       double started)
{
    PyObject *key = PyBytes_FromStringAndSize(req, len);
    if (key == NULL) {
        PyErr_Clear();
        return 0;
    }
    PyObject *entry = PyDict_GetItemWithError(table, key); /* borrowed */
    Py_DECREF(key);
    if (entry == NULL) {
        PyErr_Clear();
        return 0;
    }
    if (!PyList_CheckExact(entry) || PyList_Size(entry) != 4)
        return 0;
    PyObject *reply = PyList_GetItem(entry, 0); /* borrowed, as the three below */
    PyObject *expires = PyList_GetItem(entry, 1);
    PyObject *hits = PyList_GetItem(entry, 2);
    PyObject *seconds = PyList_GetItem(entry, 3);
    if (!PyBytes_CheckExact(reply) || !PyFloat_CheckExact(expires) ||
        !PyLong_CheckExact(hits) || !PyFloat_CheckExact(seconds))
        return 0;
    if (!(now < PyFloat_AsDouble(expires)))
        return 0;
    char *data;
    Py_ssize_t size;
    if (PyBytes_AsStringAndSize(reply, &data, &size) < 0) {
        PyErr_Clear();
        return 0;
    }
    /* A fresh Unix socket's buffer holds far more than a kept reply (Python keeps only
     * short ones): a short write means the client is gone, as an error does. */
    (void)send(fd, data, (size_t)size, MSG_DONTWAIT | MSG_NOSIGNAL);
    close(fd);
    /* Counted for Python, which adds them to the metrics and the sources' figures. */
    Py_ssize_t count = PyLong_AsSsize_t(hits);
    if (count < 0) { /* never, as Python resets it; not an error to leave set */
        PyErr_Clear();
        count = 0;
    }
    PyObject *more = PyLong_FromSsize_t(count + 1);
    PyObject *spent = PyFloat_FromDouble(PyFloat_AsDouble(seconds) + monotonic() - started);
    if (more == NULL || spent == NULL) {
        Py_XDECREF(more);
        Py_XDECREF(spent);
        PyErr_Clear();
        return 1;
    }
    PyList_SetItem(entry, 2, more); /* steals the new value, drops the old one */
    PyList_SetItem(entry, 3, spent);
    return 1;
}

/* serve(listen_fd, table, now, batch) -> (answered, [(fd, bytes read, complete)], errno)
 *
 * errno: 0, or the accept4() error that stopped the batch for want of resources (EMFILE,
 * ENFILE, ENOBUFS, ENOMEM): Python makes room. */
static PyObject *serve(PyObject *Py_UNUSED(self), PyObject *args)
{
    int listen_fd, batch;
    PyObject *table;
    double now;
    if (!PyArg_ParseTuple(args, "iO!di", &listen_fd, &PyDict_Type, &table, &now, &batch))
        return NULL;
    PyObject *rest = PyList_New(0);
    if (rest == NULL)
        return NULL;
    long answered = 0;
    int failed = 0;
    char buf[READ_SIZE];
    for (int i = 0; i < batch; i++) {
        int fd = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED || errno == EPROTO)
                continue; /* that client is gone */
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM)
                failed = errno;
            break; /* EAGAIN: nobody else waiting */
        }
        double started = monotonic();
        Py_ssize_t n = 0;
        int eof = 0, gone = 0;
        while (n < READ_SIZE) {
            ssize_t got = recv(fd, buf + n, (size_t)(READ_SIZE - n), MSG_DONTWAIT);
            if (got > 0) {
                n += got;
                if (memchr(buf + n - got, '\n', (size_t)got) != NULL)
                    break;
                continue;
            }
            if (got == 0)
                eof = 1;
            else if (errno == EINTR)
                continue;
            else if (errno != EAGAIN && errno != EWOULDBLOCK)
                gone = 1;
            break;
        }
        if (gone) { /* reset by the client: nobody to answer */
            close(fd);
            continue;
        }
        Py_ssize_t len = request_length(buf, n, eof);
        if (len > 0 && answer_from(table, fd, buf, len, now, started)) {
            answered++;
            continue;
        }
        PyObject *item = Py_BuildValue("(iy#O)", fd, buf, n, (len > 0) ? Py_True : Py_False);
        if (item == NULL || PyList_Append(rest, item) < 0) {
            /* Out of memory: no client accepted here is left open. */
            Py_XDECREF(item);
            close(fd);
            for (Py_ssize_t j = 0; j < PyList_Size(rest); j++)
                close((int)PyLong_AsLong(PyTuple_GetItem(PyList_GetItem(rest, j), 0)));
            Py_DECREF(rest);
            return NULL;
        }
        Py_DECREF(item);
    }
    PyObject *result = Py_BuildValue("(lNi)", answered, rest, failed);
    return result;
}

static PyMethodDef methods[] = {
    {"serve", serve, METH_VARARGS,
     "serve(listen_fd, table, now, batch) -> (answered, [(fd, data, complete)], errno)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_fastpath",
    .m_doc = "lookupd's compiled front end: answers kept replies without Python per client.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__fastpath(void)
{
    return PyModule_Create(&module);
}
