/* The compiled fast lane of the WSGI engine (issue 21): one C protocol for the common request cycle.
 *
 * `Conn` implements asyncio.Protocol's methods (uvloop duck-types protocols) for the shape that almost all
 * traffic has: a complete GET/POST/PUT/DELETE/PATCH/OPTIONS head in HTTP/1.1 with an origin-form target,
 * Host, optionally Content-Length with its whole body in the same read, Connection close or keep-alive,
 * answered by an app that returns a one-element list of bytes under a plain head. For it this file parses
 * the head itself (a strict subset of RFC 9112, written for this and nothing else), builds the environ
 * from the connection's base dict, calls the app, and writes the engine's own cached head and the body in
 * one write.
 *
 * Everything else is not handled here but handed off: the Python subclass (clusterctl/http/fastlane.py)
 * swaps the connection to the pure-Python protocol (`transport.set_protocol`) and feeds it the bytes not
 * yet consumed, so llhttp and the Python engine's defences decide every case outside the strict set
 * (chunked bodies, Expect, Upgrade, obs-fold, bare LF, duplicate framing or Host headers, odd targets,
 * limits, heads split over reads, HTTP/1.0, HEAD). When the app has already run (a streamed or odd
 * response, an exception, write()), the Python protocol adopts the response in progress.
 *
 * Shared state is the Python `Server`'s (connections, served, in_flight, app_req, date_line, heads ...),
 * read and written in its slots (`__slots__`, at the offsets its member descriptors give) exactly as the
 * Python protocol does, and the Python
 * engine's own caches (targets, environ keys, compiled heads) are used, so both lanes answer alike.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

/* connection phases, as the Python engine's IDLE, HEAD */
#define PH_IDLE 0
#define PH_HEAD 1
#define MAX_HEADERS 64
#define JOIN_MAX 65536 /* the Python engine's _JOIN_MAX: a bigger body is written after its head, uncopied */

/* from configure(): the Python engine's caches and helpers */
static PyObject *g_targets, *g_target_fn, *g_env_keys, *g_env_key_fn, *g_empty_input, *g_bytesio;

static PyObject *s_write, *s_close, *s_get_extra_info, *s_sockname, *s_peername, *s_connections, *s_limits,
    *s_env_bases, *s_heads, *s_date_line, *s_access_log, *s_draining, *s_app, *s_app_req, *s_in_flight, *s_served,
    *s_recycle_at, *s_on_recycle, *s_clock, *s_buffered, *s_headers, *s_plain, *s_date, *s_full, *s_code,
    *s_full_head, *s_handoff, *s_adopt, *s_over_cap, *s_env_base_for, *s_lookup_head, *s_max_connections,
    *s_max_body_size, *s_max_request_line, *s_max_header_field, *s_max_header_size, *s_max_headers, *s_max_buffered,
    *s_app_owner, *s_socket, *s_fileno;
static PyObject *k_method, *k_path, *k_query, *k_raw, *k_cl, *k_input, *k_raddr, *k_rport, *k_cookie, *k_host;
static PyObject *u_comma, *u_semi;

/* methods served here (anything else, HEAD included, goes to the Python protocol) */
static const char *METHODS[] = {"GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"};
#define N_METHODS 6
static PyObject *m_str[N_METHODS], *m_bytes[N_METHODS];

/* character classes */
static unsigned char TCHAR[256], TARGET[256], VALUE[256], REGNAME[256];

static void init_tables(void) {
    const char *t = "!#$%&'*+-.^`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"; /* no '_' */
    for (const char *p = t; *p; p++) TCHAR[(unsigned char)*p] = 1;
    /* RFC 3986 pchar / "/" / "?" without '#': unreserved, sub-delims, ":@", pct-encoded's '%' */
    const char *u = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:@/?%";
    for (const char *p = u; *p; p++) TARGET[(unsigned char)*p] = 1;
    for (int c = 0x20; c < 0x7f; c++) VALUE[c] = 1;
    VALUE['\t'] = 1;
    const char *r = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=%";
    for (const char *p = r; *p; p++) REGNAME[(unsigned char)*p] = 1;
}

/* -- the strict head parser ------------------------------------------------------------------------------ */

enum { K_PLAIN, K_HOST, K_CL, K_CT, K_CONN, K_OUT };

typedef struct {
    const char *name, *value;
    Py_ssize_t nlen, vlen;
    int kind;
} Header;

typedef struct {
    int method;
    const char *target;
    Py_ssize_t tlen, head_len, nheaders;
    long long cl; /* -1: no Content-Length */
    int keep;
    Header h[MAX_HEADERS];
} Req;

static int lower_eq(const char *a, Py_ssize_t n, const char *lower) {
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)a[i];
        if (c >= 'A' && c <= 'Z') c += 32;
        if (c != (unsigned char)lower[i]) return 0;
    }
    return lower[n] == 0;
}

static int header_kind(const char *n, Py_ssize_t len) {
    switch (len) {
    case 4: return lower_eq(n, 4, "host") ? K_HOST : K_PLAIN;
    case 6: return lower_eq(n, 6, "expect") ? K_OUT : K_PLAIN;
    case 7: return lower_eq(n, 7, "upgrade") ? K_OUT : K_PLAIN;
    case 10: return lower_eq(n, 10, "connection") ? K_CONN : K_PLAIN;
    case 12: return lower_eq(n, 12, "content-type") ? K_CT : K_PLAIN;
    case 14: return lower_eq(n, 14, "content-length") ? K_CL : K_PLAIN;
    case 16: return lower_eq(n, 16, "proxy-connection") ? K_OUT : K_PLAIN; /* llhttp reads it as Connection */
    case 17: return lower_eq(n, 17, "transfer-encoding") ? K_OUT : K_PLAIN;
    }
    return K_PLAIN;
}

/* uri-host [":" port] with a reg-name or IPv4 host, as the Python engine's _check_host accepts them
   (an [IP-literal] is left to it) */
static int good_host(const char *v, Py_ssize_t n) {
    Py_ssize_t i = 0;
    while (i < n && REGNAME[(unsigned char)v[i]]) i++;
    if (i == 0) return 0;
    if (i == n) return 1;
    if (v[i] != ':' || i + 1 == n) return 0;
    for (i++; i < n; i++)
        if (v[i] < '0' || v[i] > '9') return 0;
    return 1;
}

/* 1: a complete head inside the strict set, described in r; 0: anything else (the Python protocol's).
   buf[len] must be readable and not a valid character (a bytes object's trailing NUL): every scan stops
   inside the buffer, and a position past `lim` (the smallest head limit) rejects. */
static int parse_head(const char *buf, Py_ssize_t len, Py_ssize_t limit, Py_ssize_t max_headers,
                      long long max_body, Req *r) {
    const char *p = buf, *lim = buf + (len < limit ? len : limit);
    r->method = -1;
    for (int m = 0; m < N_METHODS; m++) {
        size_t ml = strlen(METHODS[m]);
        if ((size_t)(lim - p) > ml && memcmp(p, METHODS[m], ml) == 0 && p[ml] == ' ') {
            r->method = m;
            p += ml + 1;
            break;
        }
    }
    if (r->method < 0 || *p != '/') return 0;
    r->target = p;
    while (TARGET[(unsigned char)*p]) p++;
    r->tlen = p - r->target;
    if (lim - p < 11 || memcmp(p, " HTTP/1.1\r\n", 11) != 0) return 0;
    p += 11;
    int hosts = 0, cts = 0, conns = 0;
    r->cl = -1;
    r->keep = 1;
    r->nheaders = 0;
    for (;;) {
        if (lim - p < 2) return 0; /* incomplete here, or over the limit: the Python protocol's */
        if (p[0] == '\r' && p[1] == '\n') {
            p += 2;
            break;
        }
        const char *name = p;
        while (TCHAR[(unsigned char)*p]) p++;
        if (p == name || *p != ':' || r->nheaders >= MAX_HEADERS || r->nheaders >= max_headers) return 0;
        Header *h = &r->h[r->nheaders++];
        h->name = name;
        h->nlen = p - name;
        p++;
        while (*p == ' ' || *p == '\t') p++;
        const char *v = p;
        while (VALUE[(unsigned char)*p]) p++;
        /* a control character, a bare CR or LF, obs-text: not here */
        if (lim - p < 2 || p[0] != '\r' || p[1] != '\n') return 0;
        h->value = v; /* trailing whitespace kept: llhttp keeps it, and both lanes must agree */
        h->vlen = p - v;
        p += 2;
        h->kind = header_kind(name, h->nlen);
        switch (h->kind) {
        case K_OUT: return 0;
        case K_HOST:
            if (hosts++ || !good_host(v, h->vlen)) return 0;
            break;
        case K_CT:
            if (cts++) return 0;
            break;
        case K_CL: {
            if (r->cl >= 0 || h->vlen == 0 || h->vlen > 15) return 0;
            long long n = 0;
            for (Py_ssize_t i = 0; i < h->vlen; i++) {
                if (v[i] < '0' || v[i] > '9') return 0;
                n = n * 10 + (v[i] - '0');
            }
            if (n > max_body) return 0;
            r->cl = n;
            break;
        }
        case K_CONN:
            if (conns++) return 0;
            if (lower_eq(v, h->vlen, "close")) r->keep = 0;
            else if (!lower_eq(v, h->vlen, "keep-alive")) return 0;
            break;
        }
    }
    if (hosts != 1) return 0;
    r->head_len = p - buf;
    return 1;
}

/* -- environ keys: header name as sent -> environ key, a small C cache in front of the engine's ------------ */

#define KEY_SLOTS 256
#define KEY_MAX 40
typedef struct {
    Py_ssize_t len;
    char name[KEY_MAX];
    PyObject *key;
} KeySlot;
static KeySlot key_cache[KEY_SLOTS];

static PyObject *env_key(const char *name, Py_ssize_t len) { /* a new reference */
    unsigned int hash = 2166136261u;
    for (Py_ssize_t i = 0; i < len; i++) hash = (hash ^ (unsigned char)name[i]) * 16777619u;
    KeySlot *slot = &key_cache[hash % KEY_SLOTS];
    if (slot->key != NULL && slot->len == len && memcmp(slot->name, name, (size_t)len) == 0) return Py_NewRef(slot->key);
    PyObject *b = PyBytes_FromStringAndSize(name, len);
    if (b == NULL) return NULL;
    PyObject *key = PyDict_GetItemWithError(g_env_keys, b);
    if (key != NULL) Py_INCREF(key);
    else if (!PyErr_Occurred()) key = PyObject_CallOneArg(g_env_key_fn, b);
    Py_DECREF(b);
    if (key != NULL && len <= KEY_MAX && slot->key == NULL) { /* first come keeps the slot: no churn */
        slot->len = len;
        memcpy(slot->name, name, (size_t)len);
        slot->key = Py_NewRef(key);
    }
    return key;
}

/* the exception being raised, taken (3.11 has no PyErr_GetRaisedException) */
static PyObject *take_exception(void) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL && value != NULL) PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value;
}

/* -- the protocol ------------------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *server, *transport, *base_env, *app, *heads, *access_log;
    PyObject *status, *resp_headers, *written, *write_cb, *req_line;
    PyObject *adopted; /* the Python protocol this connection was handed to */
    PyObject *remote_addr, *remote_port; /* this peer's, for its environ */
    double since, t0;
    Py_ssize_t head_limit, max_headers, max_connections;
    long long max_body, max_buffered;
    char closed, busy, got_bytes, write_paused, detached, recycling;
    int phase;
} Conn;

static PyTypeObject ConnType;

static double monotonic(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* time.perf_counter()'s clock on Linux */
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* every object the struct holds, for traverse and clear */
#define CONN_OBJECTS(X) X(server) X(transport) X(base_env) X(app) X(heads) X(access_log) X(status) \
    X(resp_headers) X(written) X(write_cb) X(req_line) X(adopted) \
    X(remote_addr) X(remote_port)

static int conn_traverse(Conn *self, visitproc visit, void *arg) {
#define VISIT(f) Py_VISIT(self->f);
    CONN_OBJECTS(VISIT)
    return 0;
}

static int conn_clear(Conn *self) {
#define CLEAR(f) Py_CLEAR(self->f);
    CONN_OBJECTS(CLEAR)
    return 0;
}

static void conn_dealloc(Conn *self) {
    PyObject_GC_UnTrack(self);
    conn_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* the limits, read once per Server object (its Limits are fixed for its life) */
static PyObject *lim_server; /* strong: its address cannot be reused while cached */
static Py_ssize_t lim_head, lim_headers, lim_conns;
static long long lim_body, lim_buffered;

static long long lim_get(PyObject *limits, PyObject *name) {
    PyObject *v = PyObject_GetAttr(limits, name);
    if (v == NULL) return -1;
    long long n = PyLong_AsLongLong(v);
    Py_DECREF(v);
    return n;
}

static int read_limits(PyObject *server) {
    if (server == lim_server) return 0;
    PyObject *limits = PyObject_GetAttr(server, s_limits);
    if (limits == NULL) return -1;
    long long line = lim_get(limits, s_max_request_line), field = lim_get(limits, s_max_header_field),
              size = lim_get(limits, s_max_header_size), n = lim_get(limits, s_max_headers),
              body = lim_get(limits, s_max_body_size), conns = lim_get(limits, s_max_connections),
              buffered = lim_get(limits, s_max_buffered);
    Py_DECREF(limits);
    if (PyErr_Occurred()) return -1;
    long long head = line < field ? line : field;
    lim_head = (Py_ssize_t)(head < size ? head : size); /* a head this short cannot break any of the three */
    lim_headers = (Py_ssize_t)n;
    lim_body = body;
    lim_conns = (Py_ssize_t)conns;
    lim_buffered = buffered;
    Py_INCREF(server);
    Py_XSETREF(lim_server, server);
    return 0;
}

/* The Server's attributes live in slots: each name's offset, from the member descriptor of the Server's type,
   found once per type (names are this file's interned strings, so a pointer compares them). */
#define SLOT_NAMES 32
static PyObject *slot_type; /* strong: its address cannot be reused while cached */
static PyObject *slot_name[SLOT_NAMES];
static Py_ssize_t slot_off[SLOT_NAMES];
static int slot_count;

static Py_ssize_t slot_offset(PyObject *server, PyObject *name) {
    PyTypeObject *tp = Py_TYPE(server);
    if ((PyObject *)tp != slot_type) {
        Py_XSETREF(slot_type, Py_NewRef((PyObject *)tp));
        slot_count = 0;
    }
    for (int i = 0; i < slot_count; i++)
        if (slot_name[i] == name) return slot_off[i];
    PyObject *d = _PyType_Lookup(tp, name); /* borrowed */
    if (d == NULL || !Py_IS_TYPE(d, &PyMemberDescr_Type)
        || ((PyMemberDescrObject *)d)->d_member->type != T_OBJECT_EX) {
        PyErr_Format(PyExc_TypeError, "the compiled lane needs the engine's Server: %R is not a slot of %s", name,
                     tp->tp_name);
        return -1;
    }
    Py_ssize_t off = ((PyMemberDescrObject *)d)->d_member->offset;
    if (slot_count < SLOT_NAMES) {
        slot_name[slot_count] = name;
        slot_off[slot_count++] = off;
    }
    return off;
}

static PyObject *sget(Conn *self, PyObject *name) { /* borrowed */
    Py_ssize_t off = slot_offset(self->server, name);
    if (off < 0) return NULL;
    PyObject *v = *(PyObject **)((char *)self->server + off);
    if (v == NULL) PyErr_SetObject(PyExc_AttributeError, name);
    return v;
}

static int sset(Conn *self, PyObject *name, PyObject *value) {
    Py_ssize_t off = slot_offset(self->server, name);
    if (off < 0) return -1;
    PyObject **p = (PyObject **)((char *)self->server + off);
    Py_XSETREF(*p, Py_NewRef(value));
    return 0;
}

static int conn_init(Conn *self, PyObject *args, PyObject *kwds) {
    PyObject *server;
    if (!PyArg_ParseTuple(args, "O:Conn", &server)) return -1;
    if (g_targets == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_fast.configure() has not been called (import clusterctl.http.fastlane)");
        return -1;
    }
    if (read_limits(server) < 0) return -1;
    Py_INCREF(server);
    Py_XSETREF(self->server, server);
    PyObject *app = sget(self, s_app), *heads = sget(self, s_heads), *log = sget(self, s_access_log),
             *clock = sget(self, s_clock), *hook = sget(self, s_on_recycle);
    if (app == NULL || heads == NULL || log == NULL || clock == NULL || hook == NULL) return -1;
    self->recycling = hook != Py_None;
    Py_INCREF(app);
    Py_XSETREF(self->app, app);
    Py_INCREF(heads);
    Py_XSETREF(self->heads, heads);
    if (log != Py_None) {
        Py_INCREF(log);
        Py_XSETREF(self->access_log, log);
    }
    self->since = PyFloat_AsDouble(clock);
    self->phase = PH_HEAD;
    self->head_limit = lim_head;
    self->max_headers = lim_headers;
    self->max_body = lim_body;
    self->max_buffered = lim_buffered;
    self->max_connections = lim_conns;
    return PyErr_Occurred() ? -1 : 0;
}

/* The engine's base environ of a local address plus a placeholder for every key each request sets (its
   copy per request then takes them without growing: a resize rehashes the whole environ). Borrowed. */
#define AUG_SLOTS 4
static PyObject *aug_plain[AUG_SLOTS], *aug_base[AUG_SLOTS];
static int aug_next;

static PyObject *augmented(PyObject *plain) {
    for (int i = 0; i < AUG_SLOTS; i++)
        if (aug_plain[i] == plain) return aug_base[i];
    PyObject *d = PyDict_Copy(plain);
    if (d == NULL) return NULL;
    PyObject *always[] = {k_method, k_path, k_query, k_raw, k_host, k_input};
    for (size_t i = 0; i < sizeof always / sizeof *always; i++)
        if (PyDict_SetItem(d, always[i], Py_None) < 0) {
            Py_DECREF(d);
            return NULL;
        }
    int slot = aug_next++ % AUG_SLOTS;
    Py_XSETREF(aug_plain[slot], Py_NewRef(plain)); /* strong: its address is not reused while cached */
    Py_XSETREF(aug_base[slot], d);
    return d;
}

/* decimal digits of v at p (PyUnicode_FromFormat costs ~2.5k instructions a call); how many were written */
static int put_uint(char *p, unsigned long long v) {
    char tmp[24];
    int n = 0;
    do tmp[n++] = (char)('0' + v % 10); while ((v /= 10) != 0);
    for (int i = 0; i < n; i++) p[i] = tmp[n - 1 - i];
    return n;
}

static PyObject *uint_str(unsigned long long v) {
    char buf[24];
    return PyUnicode_DecodeASCII(buf, put_uint(buf, v), NULL);
}

/* -- the connection's addresses, for the environ ------------------------------------------------------------
   uvloop's get_extra_info("sockname"/"peername") builds a Python address per call (~2k instructions each, per
   connection); the descriptor's own getsockname/getpeername answer the common cases for less. Anything else
   (no socket, not IPv4 for the peer, an unknown local address) asks the transport as the Python protocol does. */

/* the transport's socket descriptor, or -1 */
static int transport_fd(PyObject *transport) {
    PyObject *sock = PyObject_CallMethodOneArg(transport, s_get_extra_info, s_socket);
    if (sock == NULL) {
        PyErr_Clear();
        return -1;
    }
    long fd = -1;
    if (sock != Py_None) {
        PyObject *n = PyObject_CallMethodNoArgs(sock, s_fileno);
        if (n != NULL) {
            fd = PyLong_AsLong(n);
            Py_DECREF(n);
        }
        if (PyErr_Occurred()) {
            PyErr_Clear();
            fd = -1;
        }
    }
    Py_DECREF(sock);
    return (int)fd;
}

/* local address (raw) -> the augmented base environ for it; its content depends on the address alone */
#define ADDR_SLOTS 4
typedef struct {
    struct sockaddr_storage addr;
    socklen_t len;
    PyObject *aug;
} AddrSlot;
static AddrSlot addr_slots[ADDR_SLOTS];
static int addr_next;

static PyObject *base_by_address(int fd) { /* borrowed; NULL (no error) when not known */
    struct sockaddr_storage a;
    socklen_t len = sizeof a;
    if (getsockname(fd, (struct sockaddr *)&a, &len) != 0) return NULL;
    for (int i = 0; i < ADDR_SLOTS; i++)
        if (addr_slots[i].aug != NULL && addr_slots[i].len == len && memcmp(&addr_slots[i].addr, &a, len) == 0)
            return addr_slots[i].aug;
    return NULL;
}

static void remember_address(int fd, PyObject *aug) {
    AddrSlot *slot = &addr_slots[addr_next++ % ADDR_SLOTS];
    socklen_t len = sizeof slot->addr;
    memset(&slot->addr, 0, sizeof slot->addr);
    if (getsockname(fd, (struct sockaddr *)&slot->addr, &len) != 0) {
        Py_CLEAR(slot->aug);
        return;
    }
    slot->len = len;
    Py_XSETREF(slot->aug, Py_NewRef(aug));
}

/* the Python protocol's way: the transport's sockname, the engine's base for it (borrowed) */
static PyObject *base_by_sockname(Conn *self, PyObject *transport) {
    PyObject *sockname = PyObject_CallMethodOneArg(transport, s_get_extra_info, s_sockname);
    if (sockname == NULL) return NULL;
    PyObject *bases = sget(self, s_env_bases), *base = NULL;
    if (bases != NULL) {
        base = PyDict_GetItemWithError(bases, sockname);
        if (base != NULL) Py_INCREF(base);
        else if (!PyErr_Occurred()) base = PyObject_CallMethodOneArg((PyObject *)self, s_env_base_for, sockname);
    }
    Py_DECREF(sockname);
    if (base == NULL) return NULL;
    PyObject *aug = augmented(base);
    Py_DECREF(base);
    return aug;
}

/* REMOTE_ADDR/REMOTE_PORT of an IPv4 peer as str(peername[0]), str(peername[1]); 0 (no error) when not one */
static int ipv4_peer(Conn *self, int fd) {
    struct sockaddr_storage a;
    socklen_t len = sizeof a;
    if (getpeername(fd, (struct sockaddr *)&a, &len) != 0 || a.ss_family != AF_INET) return 0;
    const struct sockaddr_in *in = (const struct sockaddr_in *)&a;
    const unsigned char *b = (const unsigned char *)&in->sin_addr.s_addr;
    char text[16];
    int n = 0;
    for (int i = 0; i < 4; i++) {
        n += put_uint(text + n, b[i]);
        if (i < 3) text[n++] = '.';
    }
    PyObject *addr = PyUnicode_DecodeASCII(text, n, NULL);
    PyObject *port = addr ? uint_str(ntohs(in->sin_port)) : NULL;
    if (port == NULL) {
        Py_XDECREF(addr);
        return 0;
    }
    Py_XSETREF(self->remote_addr, addr);
    Py_XSETREF(self->remote_port, port);
    return 1;
}

static PyObject *conn_connection_made(Conn *self, PyObject *transport) {
    if (self->server == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Conn.__init__(server) was not called");
        return NULL;
    }
    Py_INCREF(transport);
    Py_XSETREF(self->transport, transport);
    PyObject *conns = sget(self, s_connections);
    if (conns == NULL || PySet_Add(conns, (PyObject *)self) < 0) return NULL;
    if (PySet_GET_SIZE(conns) > self->max_connections) { /* make room, else 503 (the Python protocol's way) */
        PyObject *rejected = PyObject_CallMethodNoArgs((PyObject *)self, s_over_cap);
        if (rejected == NULL) return NULL;
        int r = PyObject_IsTrue(rejected);
        Py_DECREF(rejected);
        if (r) Py_RETURN_NONE;
    }
    /* the environ's fixed part for this local address, shared by its connections; this peer's part is set
       per request (one dict copy per request, none per connection) */
    int fd = transport_fd(transport);
    PyObject *aug = fd >= 0 ? base_by_address(fd) : NULL;
    if (aug == NULL) {
        if (PyErr_Occurred()) return NULL;
        if ((aug = base_by_sockname(self, transport)) == NULL) return NULL;
        if (fd >= 0) remember_address(fd, aug);
    }
    Py_XSETREF(self->base_env, Py_NewRef(aug));
    if (fd >= 0 && ipv4_peer(self, fd)) Py_RETURN_NONE;
    if (PyErr_Occurred()) return NULL;
    PyObject *peer = PyObject_CallMethodOneArg(transport, s_get_extra_info, s_peername);
    if (peer == NULL) return NULL;
    if (PyTuple_Check(peer) && PyTuple_GET_SIZE(peer) >= 2) {
        Py_XSETREF(self->remote_addr, PyObject_Str(PyTuple_GET_ITEM(peer, 0)));
        Py_XSETREF(self->remote_port, PyObject_Str(PyTuple_GET_ITEM(peer, 1)));
        if (self->remote_addr == NULL || self->remote_port == NULL) {
            Py_DECREF(peer);
            return NULL;
        }
    }
    Py_DECREF(peer);
    Py_RETURN_NONE;
}

/* hand the connection to the Python protocol with data[pos:] still to parse */
static PyObject *handoff(Conn *self, PyObject *data, Py_ssize_t pos) {
    PyObject *rest = pos == 0 ? (Py_INCREF(data), data)
                              : PyBytes_FromStringAndSize(PyBytes_AS_STRING(data) + pos, PyBytes_GET_SIZE(data) - pos);
    if (rest == NULL) return NULL;
    self->detached = 1;
    Py_CLEAR(self->write_cb);
    PyObject *r = PyObject_CallMethodOneArg((PyObject *)self, s_handoff, rest);
    Py_DECREF(rest);
    return r;
}

static int counter_add(Conn *self, PyObject *name, long delta) {
    PyObject *v = sget(self, name);
    if (v == NULL) return -1;
    long n = PyLong_AsLong(v);
    if (n == -1 && PyErr_Occurred()) return -1;
    PyObject *nv = PyLong_FromLong(n + delta);
    if (nv == NULL) return -1;
    int r = sset(self, name, nv);
    Py_DECREF(nv);
    return r;
}

/* The request is over on this side: the Python protocol takes the response in progress (app_result, or the
   exception exc) and the bytes after the request. */
static int adopt(Conn *self, PyObject *req, int keep, PyObject *result, PyObject *exc, PyObject *data,
                 Py_ssize_t end) {
    if (counter_add(self, s_in_flight, 1) < 0) return -1;
    PyObject *rest = PyBytes_FromStringAndSize(PyBytes_AS_STRING(data) + end, PyBytes_GET_SIZE(data) - end);
    if (rest == NULL) return -1;
    self->detached = 1;
    self->busy = 0;
    PyObject *args[] = {(PyObject *)self, req, keep ? Py_True : Py_False,
                        self->status ? self->status : Py_None, self->resp_headers ? self->resp_headers : Py_None,
                        result ? result : Py_None, self->written ? self->written : Py_None,
                        exc ? exc : Py_None, rest};
    PyObject *r = PyObject_VectorcallMethod(s_adopt, args, 9, NULL);
    Py_DECREF(rest);
    Py_CLEAR(self->status);
    Py_CLEAR(self->resp_headers);
    Py_CLEAR(self->written);
    Py_CLEAR(self->write_cb); /* refers back to us: an app that kept it keeps us, not the other way round */
    Py_XDECREF(r);
    return r == NULL ? -1 : 1;
}

static int set_header(PyObject *env, PyObject *key, const char *v, Py_ssize_t n) {
    PyObject *val = PyUnicode_DecodeLatin1(v, n, NULL);
    if (val == NULL) return -1;
    PyObject *old = PyDict_SetDefault(env, key, val);
    int r = 0;
    if (old == NULL) r = -1;
    else if (old != val) { /* a repeated header: merged per RFC 9110, cookies with "; " */
        PyObject *sep = PyUnicode_Compare(key, k_cookie) == 0 ? u_semi : u_comma;
        PyObject *a = PyUnicode_Concat(old, sep), *merged = a ? PyUnicode_Concat(a, val) : NULL;
        Py_XDECREF(a);
        r = merged == NULL ? -1 : PyDict_SetItem(env, key, merged);
        Py_XDECREF(merged);
    }
    Py_DECREF(val);
    return r;
}

/* The environ for r (a new reference), or NULL. */
static PyObject *build_environ(Conn *self, const char *buf, Req *r, PyObject *target) {
    PyObject *env = PyDict_Copy(self->base_env);
    if (env == NULL) return NULL;
    if (PyDict_SetItem(env, k_method, m_str[r->method]) < 0) goto fail;
    if (self->remote_addr != NULL
        && (PyDict_SetItem(env, k_raddr, self->remote_addr) < 0 || PyDict_SetItem(env, k_rport, self->remote_port) < 0))
        goto fail;
    PyObject *t = PyDict_GetItemWithError(g_targets, target);
    if (t != NULL) Py_INCREF(t);
    else if (PyErr_Occurred() || (t = PyObject_CallOneArg(g_target_fn, target)) == NULL) goto fail;
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 3 || PyDict_SetItem(env, k_path, PyTuple_GET_ITEM(t, 0)) < 0
        || PyDict_SetItem(env, k_query, PyTuple_GET_ITEM(t, 1)) < 0
        || PyDict_SetItem(env, k_raw, PyTuple_GET_ITEM(t, 2)) < 0) {
        Py_DECREF(t);
        goto fail;
    }
    Py_DECREF(t);
    for (Py_ssize_t i = 0; i < r->nheaders; i++) {
        Header *h = &r->h[i];
        if (h->kind == K_CL) continue; /* CONTENT_LENGTH is the body's length, below */
        if (h->kind == K_HOST) { /* exactly one, over its placeholder */
            PyObject *v = PyUnicode_DecodeLatin1(h->value, h->vlen, NULL);
            int bad = v == NULL || PyDict_SetItem(env, k_host, v) < 0;
            Py_XDECREF(v);
            if (bad) goto fail;
            continue;
        }
        PyObject *key = env_key(h->name, h->nlen);
        int bad = key == NULL || (PyUnicode_GET_LENGTH(key) > 0 && set_header(env, key, h->value, h->vlen) < 0);
        Py_XDECREF(key);
        if (bad) goto fail;
    }
    if (r->cl >= 0) {
        PyObject *n = uint_str((unsigned long long)r->cl);
        PyObject *body = PyBytes_FromStringAndSize(buf + r->head_len, (Py_ssize_t)r->cl);
        PyObject *input = body ? PyObject_CallOneArg(g_bytesio, body) : NULL;
        int bad = n == NULL || input == NULL || PyDict_SetItem(env, k_cl, n) < 0 || PyDict_SetItem(env, k_input, input) < 0;
        Py_XDECREF(n);
        Py_XDECREF(body);
        Py_XDECREF(input);
        if (bad) goto fail;
    } else if (PyDict_SetItem(env, k_input, g_empty_input) < 0) goto fail;
    return env;
fail:
    Py_DECREF(env);
    return NULL;
}

/* The compiled head (the engine's _Head) for this response's status and headers, or NULL. */
static PyObject *response_head(Conn *self) {
    PyObject *h = PyDict_GetItemWithError(self->heads, self->status);
    if (h != NULL) {
        PyObject *hh = PyObject_GetAttr(h, s_headers);
        if (hh == NULL) return NULL;
        int same = hh == self->resp_headers ? 1 : PyObject_RichCompareBool(hh, self->resp_headers, Py_EQ);
        Py_DECREF(hh);
        if (same < 0) return NULL;
        if (same) return Py_NewRef(h);
    } else if (PyErr_Occurred()) return NULL;
    return PyObject_CallMethodNoArgs((PyObject *)self, s_lookup_head); /* compiles, validates, caches */
}

/* The full head bytes (Date, Content-Length, close) of an n-byte body under h, a new reference; Py_None when
   h does not allow the fast path; NULL on error. */
static PyObject *full_head(PyObject *h, PyObject *date, Py_ssize_t n, int keep) {
    PyObject *plain = PyObject_GetAttr(h, s_plain);
    if (plain == NULL) return NULL;
    Py_DECREF(plain);
    if (plain != Py_True) Py_RETURN_NONE;
    PyObject *key = PyLong_FromSsize_t(keep ? n : ~n);
    if (key == NULL) return NULL;
    PyObject *hdate = PyObject_GetAttr(h, s_date), *full = NULL;
    if (hdate == NULL) goto out;
    Py_DECREF(hdate);
    if (hdate == date) {
        PyObject *cache = PyObject_GetAttr(h, s_full);
        if (cache == NULL) goto out;
        full = PyDict_GetItemWithError(cache, key);
        Py_XINCREF(full);
        Py_DECREF(cache);
        if (full == NULL && PyErr_Occurred()) goto out;
    }
    if (full == NULL) full = PyObject_CallMethodObjArgs(h, s_full_head, date, key, NULL);
out:
    Py_DECREF(key);
    return full;
}

/* (status object, headers, Date line, body length key) -> the full head and its status code, for the heads
   full_head() answers: the same inputs always compile to the same bytes, and this skips the attribute reads
   and the calls of the Python path. Direct-mapped by the key. */
#define HEAD_SLOTS 16
typedef struct {
    PyObject *status, *headers, *date, *full, *code;
    Py_ssize_t key;
} HeadSlot;
static HeadSlot head_slots[HEAD_SLOTS];

static int write_response(Conn *self, PyObject *head, PyObject *body) {
    Py_ssize_t hn = PyBytes_GET_SIZE(head), n = PyBytes_GET_SIZE(body);
    PyObject *r;
    if (n < JOIN_MAX) {
        PyObject *out = PyBytes_FromStringAndSize(NULL, hn + n);
        if (out == NULL) return -1;
        memcpy(PyBytes_AS_STRING(out), PyBytes_AS_STRING(head), (size_t)hn);
        memcpy(PyBytes_AS_STRING(out) + hn, PyBytes_AS_STRING(body), (size_t)n);
        r = PyObject_CallMethodOneArg(self->transport, s_write, out);
        Py_DECREF(out);
    } else { /* no copy of a big body: the transport keeps a reference until it is sent */
        r = PyObject_CallMethodOneArg(self->transport, s_write, head);
        if (r == NULL) return -1;
        Py_DECREF(r);
        r = PyObject_CallMethodOneArg(self->transport, s_write, body);
    }
    Py_XDECREF(r);
    return r == NULL ? -1 : 0;
}

/* One request: 0 when the connection goes on here, 1 when it ended or was handed over, -1 on error. */
static int serve(Conn *self, PyObject *data, Py_ssize_t pos, Req *r, Py_ssize_t end) {
    const char *buf = PyBytes_AS_STRING(data) + pos;
    PyObject *target = PyBytes_FromStringAndSize(r->target, r->tlen);
    if (target == NULL) return -1;
    PyObject *req = PyTuple_Pack(2, m_bytes[r->method], target); /* what the monitor names (watchdog.describe) */
    PyObject *env = req ? build_environ(self, buf, r, target) : NULL;
    Py_DECREF(target);
    if (env == NULL) {
        Py_XDECREF(req);
        return -1;
    }
    int keep = r->keep, rc = -1, req_set = 0;
    PyObject *result = NULL, *exc = NULL, *head = NULL, *full = NULL, *code = NULL;
    if (self->access_log != NULL) {
        self->t0 = monotonic();
        /* "METHOD target HTTP/1.1": all ASCII here (the parser's character classes) */
        const char *method = METHODS[r->method];
        size_t ml = strlen(method);
        PyObject *line = PyUnicode_New((Py_ssize_t)ml + 1 + r->tlen + 9, 127);
        if (line == NULL) goto out;
        char *d = (char *)PyUnicode_DATA(line);
        memcpy(d, method, ml);
        d[ml] = ' ';
        memcpy(d + ml + 1, r->target, (size_t)r->tlen);
        memcpy(d + ml + 1 + r->tlen, " HTTP/1.1", 9);
        Py_XSETREF(self->req_line, line);
    }
    /* in_flight is not counted for a request answered within this call (nothing else runs meanwhile to read
       it); a request the Python protocol adopts is counted there, and its finish() counts it back. */
    if (sset(self, s_app_req, req) < 0) goto out;
    self->busy = 1;
    req_set = 1;
    Py_CLEAR(self->status);
    Py_CLEAR(self->resp_headers);
    Py_CLEAR(self->written);
    PyObject *args[] = {env, (PyObject *)self};
    result = PyObject_Vectorcall(self->app, args, 2, NULL);
    if (result == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_Exception)) goto out; /* SystemExit, KeyboardInterrupt: not ours */
        exc = take_exception();
    }
    req_set = 0;
    if (sset(self, s_app_req, Py_None) < 0) goto out;
    if (exc != NULL || self->written != NULL) goto adopt;
    if (!PyList_CheckExact(result) || PyList_GET_SIZE(result) != 1 || self->status == NULL
        || !PyBytes_CheckExact(PyList_GET_ITEM(result, 0)))
        goto adopt;
    PyObject *body = PyList_GET_ITEM(result, 0);
    Py_ssize_t n = PyBytes_GET_SIZE(body), key = keep ? n : ~n;
    PyObject *date = sget(self, s_date_line);
    if (date == NULL) goto out;
    HeadSlot *slot = &head_slots[(size_t)key % HEAD_SLOTS];
    int hit = 0;
    if (slot->full != NULL && slot->status == self->status && slot->date == date && slot->key == key) {
        hit = slot->headers == self->resp_headers ? 1 : PyObject_RichCompareBool(slot->headers, self->resp_headers, Py_EQ);
        if (hit < 0) { /* headers whose comparison raises: the Python path reports it as the app's error */
            PyErr_Clear();
            hit = 0;
        }
    }
    if (hit) {
        full = Py_NewRef(slot->full);
        code = Py_NewRef(slot->code);
    } else {
        head = response_head(self);
        if (head == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_Exception)) goto out;
            exc = take_exception();
            goto adopt;
        }
        full = full_head(head, date, n, keep);
        if (full == NULL) goto out;
        if (full == Py_None) goto adopt;
        code = PyObject_GetAttr(head, s_code);
        PyObject *hh = code ? PyObject_GetAttr(head, s_headers) : NULL;
        if (hh == NULL) goto out;
        Py_XSETREF(slot->status, Py_NewRef(self->status));
        Py_XSETREF(slot->headers, hh);
        Py_XSETREF(slot->date, Py_NewRef(date));
        Py_XSETREF(slot->full, Py_NewRef(full));
        Py_XSETREF(slot->code, Py_NewRef(code));
        slot->key = key;
    }
    if (!self->closed && write_response(self, full, body) < 0) goto out;
    if (self->access_log != NULL) {
        PyObject *nb = PyLong_FromSsize_t(n);
        PyObject *largs[] = {(PyObject *)self, code, nb};
        PyObject *lr = nb ? PyObject_Vectorcall(self->access_log, largs, 3, NULL) : NULL;
        Py_XDECREF(nb);
        if (lr == NULL) goto out;
        Py_DECREF(lr);
    }
    /* finish(), as the Python protocol's */
    self->busy = 0;
    Py_CLEAR(self->status);
    Py_CLEAR(self->resp_headers);
    if (counter_add(self, s_served, 1) < 0) goto out;
    if (self->recycling) { /* --max-requests: the runtime set its hook before serving */
        PyObject *served = sget(self, s_served), *at = sget(self, s_recycle_at), *hook = sget(self, s_on_recycle);
        if (served == NULL || at == NULL || hook == NULL) goto out;
        int eq = PyObject_RichCompareBool(served, at, Py_EQ);
        if (eq < 0) goto out;
        if (eq && hook != Py_None) {
            PyObject *hr = PyObject_CallNoArgs(hook);
            if (hr == NULL) goto out;
            Py_DECREF(hr);
        }
    }
    if (!keep) {
        rc = 1;
        if (!self->closed) {
            self->closed = 1;
            PyObject *cr = PyObject_CallMethodNoArgs(self->transport, s_close);
            if (cr == NULL) rc = -1;
            Py_XDECREF(cr);
        }
        goto out;
    }
    PyObject *clock = sget(self, s_clock);
    if (clock == NULL) goto out;
    self->since = PyFloat_AsDouble(clock);
    self->phase = PH_IDLE;
    rc = PyErr_Occurred() ? -1 : 0;
    goto out;
adopt:
    rc = adopt(self, req, keep, result, exc, data, end);
out:
    if (rc < 0) { /* SystemExit from the app, or an error of ours (memory): propagate it, app slot freed */
        self->busy = 0;
        if (req_set) {
            PyObject *t, *v, *tb;
            PyErr_Fetch(&t, &v, &tb);
            if (sset(self, s_app_req, Py_None) < 0) PyErr_Clear();
            PyErr_Restore(t, v, tb);
        }
    }
    Py_XDECREF(full);
    Py_XDECREF(code);
    Py_XDECREF(head);
    Py_XDECREF(exc);
    Py_XDECREF(result);
    Py_DECREF(env);
    Py_DECREF(req);
    return rc;
}

/* After a hand-off the transport calls the Python protocol; a caller that kept this one is forwarded. */
static PyObject *forward(Conn *self, const char *method, PyObject *arg) {
    PyObject *m = PyObject_GetAttrString(self->adopted, method);
    PyObject *r = m ? PyObject_CallOneArg(m, arg) : NULL;
    Py_XDECREF(m);
    return r;
}

static PyObject *conn_data_received(Conn *self, PyObject *data) {
    if (self->adopted != NULL) return forward(self, "data_received", data);
    if (self->closed || self->detached) return Py_NewRef(Py_None); /* after a close: never look at more bytes */
    if (self->base_env == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "data_received() before connection_made()");
        return NULL;
    }
    if (!PyBytes_CheckExact(data)) {
        PyErr_SetString(PyExc_TypeError, "data_received() takes bytes");
        return NULL;
    }
    self->got_bytes = 1;
    PyObject *draining = sget(self, s_draining);
    if (draining == NULL) return NULL;
    /* draining, or a client that is not reading what we wrote: the Python protocol knows how to drain, and
       queues requests until the transport resumes writing */
    if (draining != Py_False || self->write_paused) return handoff(self, data, 0);
    const char *buf = PyBytes_AS_STRING(data);
    Py_ssize_t len = PyBytes_GET_SIZE(data), pos = 0;
    Req r;
    while (pos < len) {
        if (!parse_head(buf + pos, len - pos, self->head_limit, self->max_headers, self->max_body, &r))
            return handoff(self, data, pos);
        Py_ssize_t end = pos + r.head_len + (r.cl > 0 ? (Py_ssize_t)r.cl : 0);
        if (end > len) return handoff(self, data, pos); /* the body is still coming */
        /* A streamed response holds the app slot (one request's app code at a time): the Python protocol
           queues this request behind it (Server.app_waiting). */
        PyObject *owner = sget(self, s_app_owner);
        if (owner == NULL) return NULL;
        if (owner != Py_None) return handoff(self, data, pos);
        if (r.cl > 0) { /* the worker-wide bound on buffered bodies (the Python protocol answers 503) */
            PyObject *b = sget(self, s_buffered);
            if (b == NULL) return NULL;
            long long held = PyLong_AsLongLong(b);
            if (held == -1 && PyErr_Occurred()) return NULL;
            if (held + r.cl > self->max_buffered) return handoff(self, data, pos);
        }
        int rc = serve(self, data, pos, &r, end);
        if (rc < 0) return NULL;
        if (rc > 0) break;
        pos = end;
        if (self->write_paused && pos < len) return handoff(self, data, pos); /* flow control is the Python side's */
    }
    Py_RETURN_NONE;
}

static PyObject *conn_connection_lost(Conn *self, PyObject *exc) {
    if (self->adopted != NULL && !self->closed) {
        self->closed = 1;
        return forward(self, "connection_lost", exc);
    }
    self->closed = 1;
    if (!self->detached && self->server != NULL) {
        PyObject *conns = sget(self, s_connections);
        if (conns == NULL || PySet_Discard(conns, (PyObject *)self) < 0) return NULL;
    }
    /* write_cb refers back to us: dropping it lets reference counting free the connection */
    Py_CLEAR(self->write_cb);
    Py_CLEAR(self->status);
    Py_CLEAR(self->resp_headers);
    Py_CLEAR(self->written);
    Py_RETURN_NONE;
}

static PyObject *conn_eof_received(Conn *self, PyObject *unused) {
    Py_RETURN_NONE; /* nothing in progress between reads: let the transport close */
}

static PyObject *conn_pause_writing(Conn *self, PyObject *unused) {
    self->write_paused = 1;
    PyObject *clock = self->server ? sget(self, s_clock) : NULL;
    if (clock == NULL) return NULL;
    self->since = PyFloat_AsDouble(clock);
    if (PyErr_Occurred()) return NULL;
    Py_RETURN_NONE;
}

static PyObject *conn_resume_writing(Conn *self, PyObject *unused) {
    self->write_paused = 0;
    Py_RETURN_NONE;
}

static PyObject *conn_write(Conn *self, PyObject *data);
static PyMethodDef write_def = {"write", (PyCFunction)conn_write, METH_O, "PEP 3333's write() callable"};

/* start_response: the connection itself is the callable (no bound method per connection) */
static PyObject *conn_call(Conn *self, PyObject *args, PyObject *kwds) {
    PyObject *status, *headers, *exc_info = Py_None;
    static char *kwlist[] = {"status", "headers", "exc_info", NULL};
    Py_ssize_t nargs = PyTuple_GET_SIZE(args);
    if (self->adopted != NULL) { /* a generator's start_response after the Python protocol took the response */
        PyObject *sr = PyObject_GetAttrString(self->adopted, "start_response");
        if (sr == NULL) return NULL;
        PyObject *r = PyObject_Call(sr, args, kwds);
        Py_DECREF(sr);
        return r;
    }
    if (kwds == NULL && (nargs == 2 || nargs == 3)) { /* the usual call, without the keyword parser */
        status = PyTuple_GET_ITEM(args, 0);
        headers = PyTuple_GET_ITEM(args, 1);
        if (nargs == 3) exc_info = PyTuple_GET_ITEM(args, 2);
    } else if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|O:start_response", kwlist, &status, &headers, &exc_info))
        return NULL;
    if (!self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "start_response() called outside its request");
        return NULL;
    }
    /* With exc_info the head may be replaced: it is never sent before the app returns here (write() is
       buffered), so there is nothing to re-raise. */
    if (exc_info == Py_None && self->status != NULL) {
        PyErr_SetString(PyExc_AssertionError, "start_response() called twice without exc_info");
        return NULL;
    }
    Py_INCREF(status);
    Py_XSETREF(self->status, status);
    Py_INCREF(headers);
    Py_XSETREF(self->resp_headers, headers);
    if (self->write_cb == NULL && (self->write_cb = PyCFunction_NewEx(&write_def, (PyObject *)self, NULL)) == NULL)
        return NULL;
    return Py_NewRef(self->write_cb);
}

/* PEP 3333's write(): buffered until the app returns, then the Python protocol sends it (chunked) */
static PyObject *conn_write(Conn *self, PyObject *data) {
    if (self->adopted != NULL) {
        PyObject *w = PyObject_GetAttrString(self->adopted, "write_cb");
        PyObject *r = w ? PyObject_CallOneArg(w, data) : NULL;
        Py_XDECREF(w);
        return r;
    }
    if (!PyBytes_Check(data)) {
        PyErr_SetString(PyExc_TypeError, "write() takes bytes");
        return NULL;
    }
    if (!self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "the connection is closed");
        return NULL;
    }
    if (self->written == NULL && (self->written = PyList_New(0)) == NULL) return NULL;
    if (PyList_Append(self->written, data) < 0) return NULL;
    Py_RETURN_NONE;
}

/* the access log's view of the client (the Python adapters' ResponseWriter.client_addr) */
static PyObject *conn_client_addr(Conn *self, PyObject *unused) {
    return self->remote_addr ? Py_NewRef(self->remote_addr) : PyUnicode_New(0, 0);
}

static PyMethodDef conn_methods[] = {
    {"client_addr", (PyCFunction)conn_client_addr, METH_NOARGS, "the client's address, for the access log"},
    {"connection_made", (PyCFunction)conn_connection_made, METH_O, NULL},
    {"data_received", (PyCFunction)conn_data_received, METH_O, NULL},
    {"connection_lost", (PyCFunction)conn_connection_lost, METH_O, NULL},
    {"eof_received", (PyCFunction)conn_eof_received, METH_NOARGS, NULL},
    {"pause_writing", (PyCFunction)conn_pause_writing, METH_NOARGS, NULL},
    {"resume_writing", (PyCFunction)conn_resume_writing, METH_NOARGS, NULL},
    {"write", (PyCFunction)conn_write, METH_O, "PEP 3333's write() callable"},
    {NULL}};

static PyMemberDef conn_members[] = {
    {"server", T_OBJECT, offsetof(Conn, server), READONLY, NULL},
    {"transport", T_OBJECT, offsetof(Conn, transport), READONLY, NULL},
    {"req_line", T_OBJECT, offsetof(Conn, req_line), READONLY, "the access log's request line"},
    {"status", T_OBJECT, offsetof(Conn, status), READONLY, NULL},
    {"resp_headers", T_OBJECT, offsetof(Conn, resp_headers), READONLY, NULL},
    {"t0", T_DOUBLE, offsetof(Conn, t0), READONLY, NULL},
    {"since", T_DOUBLE, offsetof(Conn, since), 0, NULL},
    {"closed", T_BOOL, offsetof(Conn, closed), 0, NULL},
    {"busy", T_BOOL, offsetof(Conn, busy), READONLY, NULL},
    {"got_bytes", T_BOOL, offsetof(Conn, got_bytes), READONLY, NULL},
    {"write_paused", T_BOOL, offsetof(Conn, write_paused), READONLY, NULL},
    {"detached", T_BOOL, offsetof(Conn, detached), 0, NULL},
    {"adopted", T_OBJECT, offsetof(Conn, adopted), 0, "the Python protocol that took the connection over"},
    {"phase", T_INT, offsetof(Conn, phase), 0, NULL},
    {NULL}};

/* base_env: this peer's environ keys, as the Python protocol keeps them */
static PyObject *conn_get_base_env(Conn *self, void *closure) {
    PyObject *empty = PyUnicode_New(0, 0);
    PyObject *d = empty ? Py_BuildValue("{sOsO}", "REMOTE_ADDR", self->remote_addr ? self->remote_addr : empty,
                                        "REMOTE_PORT", self->remote_port ? self->remote_port : empty) : NULL;
    Py_XDECREF(empty);
    return d;
}

static PyGetSetDef conn_getset[] = {{"base_env", (getter)conn_get_base_env, NULL, "this peer's environ keys", NULL},
                                    {NULL}};

static PyTypeObject ConnType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "clusterctl.http._fast.Conn",
    .tp_basicsize = sizeof(Conn),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The compiled WSGI protocol's common request cycle (subclassed in clusterctl/http/fastlane.py).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)conn_init,
    .tp_dealloc = (destructor)conn_dealloc,
    .tp_traverse = (traverseproc)conn_traverse,
    .tp_clear = (inquiry)conn_clear,
    .tp_call = (ternaryfunc)conn_call,
    .tp_methods = conn_methods,
    .tp_members = conn_members,
    .tp_getset = conn_getset,
};

/* configure(targets, target, env_keys, env_key, empty_input, bytesio): the Python engine's caches and helpers */
static PyObject *configure(PyObject *mod, PyObject *args) {
    PyObject *t, *tf, *k, *kf, *e, *b;
    if (!PyArg_ParseTuple(args, "O!OO!OOO:configure", &PyDict_Type, &t, &tf, &PyDict_Type, &k, &kf, &e, &b))
        return NULL;
    Py_XSETREF(g_targets, Py_NewRef(t));
    Py_XSETREF(g_target_fn, Py_NewRef(tf));
    Py_XSETREF(g_env_keys, Py_NewRef(k));
    Py_XSETREF(g_env_key_fn, Py_NewRef(kf));
    Py_XSETREF(g_empty_input, Py_NewRef(e));
    Py_XSETREF(g_bytesio, Py_NewRef(b));
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {{"configure", configure, METH_VARARGS, NULL}, {NULL}};

static struct PyModuleDef fastmodule = {PyModuleDef_HEAD_INIT, "_fast", "The compiled fast lane (issue 21).", -1,
                                        module_methods};

#define INTERN(var, text) if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL

PyMODINIT_FUNC PyInit__fast(void) {
    init_tables();
    INTERN(s_write, "write"); INTERN(s_close, "close"); INTERN(s_get_extra_info, "get_extra_info");
    INTERN(s_sockname, "sockname"); INTERN(s_peername, "peername"); INTERN(s_connections, "connections");
    INTERN(s_limits, "limits"); INTERN(s_env_bases, "env_bases"); INTERN(s_heads, "heads");
    INTERN(s_date_line, "date_line"); INTERN(s_access_log, "access_log"); INTERN(s_draining, "draining");
    INTERN(s_app, "app"); INTERN(s_app_req, "app_req"); INTERN(s_in_flight, "in_flight"); INTERN(s_served, "served");
    INTERN(s_recycle_at, "recycle_at"); INTERN(s_on_recycle, "on_recycle"); INTERN(s_clock, "clock");
    INTERN(s_buffered, "buffered"); INTERN(s_headers, "headers"); INTERN(s_plain, "plain"); INTERN(s_date, "date");
    INTERN(s_full, "full"); INTERN(s_code, "code"); INTERN(s_full_head, "full_head"); INTERN(s_handoff, "_handoff");
    INTERN(s_adopt, "_adopt"); INTERN(s_over_cap, "_over_cap"); INTERN(s_env_base_for, "_env_base_for");
    INTERN(s_lookup_head, "_lookup_head"); INTERN(s_max_connections, "max_connections");
    INTERN(s_max_body_size, "max_body_size"); INTERN(s_max_request_line, "max_request_line");
    INTERN(s_max_header_field, "max_header_field"); INTERN(s_max_header_size, "max_header_size");
    INTERN(s_max_headers, "max_headers"); INTERN(s_max_buffered, "max_buffered");
    INTERN(s_app_owner, "app_owner"); INTERN(s_socket, "socket"); INTERN(s_fileno, "fileno");
    INTERN(k_method, "REQUEST_METHOD"); INTERN(k_path, "PATH_INFO"); INTERN(k_query, "QUERY_STRING");
    INTERN(k_raw, "RAW_URI"); INTERN(k_cl, "CONTENT_LENGTH"); INTERN(k_input, "wsgi.input");
    INTERN(k_raddr, "REMOTE_ADDR"); INTERN(k_rport, "REMOTE_PORT"); INTERN(k_cookie, "HTTP_COOKIE");
    INTERN(k_host, "HTTP_HOST");
    INTERN(u_comma, ","); INTERN(u_semi, "; ");
    for (int m = 0; m < N_METHODS; m++) {
        INTERN(m_str[m], METHODS[m]);
        if ((m_bytes[m] = PyBytes_FromString(METHODS[m])) == NULL) return NULL;
    }
    if (PyType_Ready(&ConnType) < 0) return NULL;
    PyObject *m = PyModule_Create(&fastmodule);
    if (m == NULL) return NULL;
    if (PyModule_AddObjectRef(m, "Conn", (PyObject *)&ConnType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
