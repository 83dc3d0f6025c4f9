/*
 * The responder index's nearest-responder search, compiled, over a compact copy of its cells.
 *
 * dispatch/geo/index.py is the reference and the owner of the index. When this module is
 * built, each CellIndex also keeps
 *
 *   a Store   — one Point {x, y, z, ts, record} per active responder, in one array, and
 *   a Cells   — per (pool, skill group) map, the same cells as the map's dict of dicts: an
 *               open-addressing table of cell keys, each the head of a list of Nodes (slots).
 *
 * index.py updates both wherever it updates its own dicts. What the Python objects cost a query
 * is mostly memory latency (a dict, a record and three floats per member, scattered over the
 * heap); here a member is 40 contiguous bytes and a row of cells is adjacent in the table.
 *
 * nearest() repeats CellIndex._search (expanding rings with the same lower bound, the same scan
 * of a small map) and the final haversine ranking. Whenever the Python search would switch to
 * its best-first tree search (far queries), it returns None and the caller runs the Python
 * search from the start, so that path has one implementation. Distances use the same libm calls
 * in the same order as dispatch.geo.distance.haversine_m (built with -ffp-contract=off), so both
 * implementations give bit-identical answers; the property tests run both.
 *
 * Like websockets' speedups.c it is optional: without a C compiler the pure-Python index runs.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <math.h>
#include <stdint.h>

#define DEG2RAD (Py_MATH_PI / 180.0)
#define HALF_PI (Py_MATH_PI / 2.0)

/* The record class of index.py (_Resp) and the slots read from it. */
enum { R_X, R_Y, R_Z, R_TS, R_RID, R_LON, R_LAT, R_NSLOTS };
static const char *resp_slots[R_NSLOTS] = {"x", "y", "z", "ts", "rid", "lon", "lat"};
static PyTypeObject *resp_type = NULL;
static Py_ssize_t resp_off[R_NSLOTS];
static double earth_radius_m = 0.0;
static double chord_delta = 0.0;
static double bound_eps = 0.0;

static PyTypeObject Store_Type;
static PyTypeObject Cells_Type;

/* -- helpers ------------------------------------------------------------------------------------- */

static inline int
as_double(PyObject *v, double *out)
{
    if (PyFloat_CheckExact(v)) {
        *out = PyFloat_AS_DOUBLE(v);
        return 0;
    }
    *out = PyFloat_AsDouble(v);
    return (*out == -1.0 && PyErr_Occurred()) ? -1 : 0;
}

/* Borrowed reference to slot `i` of a _Resp, or NULL with AttributeError when it is unset. */
static inline PyObject *
resp_slot(PyObject *rec, int i)
{
    PyObject *v = *(PyObject **)((char *)rec + resp_off[i]);
    if (v == NULL)
        PyErr_Format(PyExc_AttributeError, "_Resp.%s is unset", resp_slots[i]);
    return v;
}

/* Python's a >> b: rounds toward minus infinity for negative a as well. */
static inline long long
floor_shift(long long a, int b)
{
    long long w = 1LL << b;
    long long q = a / w;
    if ((a % w) != 0 && a < 0)
        q -= 1;
    return q;
}

/* -- Store: one point per active responder ------------------------------------------------------ */

typedef struct {
    double x, y, z, ts;
    PyObject *rec; /* strong; NULL when the slot is free */
} Point;

typedef struct {
    PyObject_HEAD
    Point *pts;
    Py_ssize_t cap;
    Py_ssize_t top;    /* slots [0, top) have been used */
    Py_ssize_t *free;  /* stack of freed slots below top */
    Py_ssize_t nfree;
} Store;

static int
point_load(Point *p, PyObject *rec)
{
    PyObject *o[4];
    for (int i = 0; i < 4; i++) {
        o[i] = resp_slot(rec, i); /* R_X, R_Y, R_Z, R_TS */
        if (o[i] == NULL)
            return -1;
    }
    double v[4];
    for (int i = 0; i < 4; i++) {
        if (as_double(o[i], &v[i]))
            return -1;
    }
    p->x = v[0];
    p->y = v[1];
    p->z = v[2];
    p->ts = v[3];
    return 0;
}

static Py_ssize_t
store_slot_arg(Store *st, PyObject *arg)
{
    Py_ssize_t s = PyLong_AsSsize_t(arg);
    if (s == -1 && PyErr_Occurred())
        return -1;
    if (s < 0 || s >= st->top || st->pts[s].rec == NULL) {
        PyErr_Format(PyExc_IndexError, "no point in slot %zd", s);
        return -1;
    }
    return s;
}

static PyObject *
Store_add(Store *st, PyObject *rec)
{
    if (!Py_IS_TYPE(rec, resp_type)) {
        PyErr_SetString(PyExc_TypeError, "Store.add takes a _Resp");
        return NULL;
    }
    Point p;
    if (point_load(&p, rec))
        return NULL;
    Py_ssize_t s;
    if (st->nfree) {
        s = st->free[--st->nfree];
    }
    else {
        if (st->top == st->cap) {
            Py_ssize_t cap = st->cap ? 2 * st->cap : 64;
            Point *pts = PyMem_Realloc(st->pts, (size_t)cap * sizeof(Point));
            if (pts == NULL)
                return PyErr_NoMemory();
            Py_ssize_t *fr = PyMem_Realloc(st->free, (size_t)cap * sizeof(Py_ssize_t));
            if (fr == NULL) {
                st->pts = pts;
                return PyErr_NoMemory();
            }
            st->pts = pts;
            st->free = fr;
            st->cap = cap;
        }
        s = st->top++;
    }
    p.rec = Py_NewRef(rec);
    st->pts[s] = p;
    return PyLong_FromSsize_t(s);
}

static PyObject *
Store_update(Store *st, PyObject *arg)
{
    Py_ssize_t s = store_slot_arg(st, arg);
    if (s < 0 || point_load(&st->pts[s], st->pts[s].rec))
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Store_remove(Store *st, PyObject *arg)
{
    Py_ssize_t s = store_slot_arg(st, arg);
    if (s < 0)
        return NULL;
    PyObject *rec = st->pts[s].rec;
    st->pts[s].rec = NULL;
    st->free[st->nfree++] = s;
    Py_DECREF(rec);
    Py_RETURN_NONE;
}

static PyObject *
Store_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    if (PyTuple_GET_SIZE(args) || (kw != NULL && PyDict_GET_SIZE(kw))) {
        PyErr_SetString(PyExc_TypeError, "Store() takes no arguments");
        return NULL;
    }
    if (resp_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "setup() was not called");
        return NULL;
    }
    return type->tp_alloc(type, 0);
}

static int
Store_traverse(Store *st, visitproc visit, void *arg)
{
    for (Py_ssize_t s = 0; s < st->top; s++)
        Py_VISIT(st->pts[s].rec);
    return 0;
}

static int
Store_clear(Store *st)
{
    for (Py_ssize_t s = 0; s < st->top; s++)
        Py_CLEAR(st->pts[s].rec);
    st->top = st->nfree = 0;
    return 0;
}

static void
Store_dealloc(Store *st)
{
    PyObject_GC_UnTrack(st);
    Store_clear(st);
    PyMem_Free(st->pts);
    PyMem_Free(st->free);
    Py_TYPE(st)->tp_free((PyObject *)st);
}

static Py_ssize_t
Store_len(Store *st)
{
    return st->top - st->nfree;
}

static PyMethodDef Store_methods[] = {
    {"add", (PyCFunction)Store_add, METH_O, "add(rec) -> slot: copy a _Resp's x, y, z, ts."},
    {"update", (PyCFunction)Store_update, METH_O, "update(slot): copy them again."},
    {"remove", (PyCFunction)Store_remove, METH_O, "remove(slot): free the slot."},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods Store_as_sequence = {.sq_length = (lenfunc)Store_len};

static PyTypeObject Store_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "dispatch.geo._speedups.Store",
    .tp_doc = "The positions of a CellIndex's active responders, packed.",
    .tp_basicsize = sizeof(Store),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = Store_new,
    .tp_dealloc = (destructor)Store_dealloc,
    .tp_traverse = (traverseproc)Store_traverse,
    .tp_clear = (inquiry)Store_clear,
    .tp_methods = Store_methods,
    .tp_as_sequence = &Store_as_sequence,
};

/* -- Cells: one map's cells, key -> list of store slots ------------------------------------------ */

#define EMPTY (-1)
#define TOMB (-2)

typedef struct {
    long long key;
    int32_t head; /* first node, EMPTY (never used) or TOMB (deleted) */
} Entry;

typedef struct {
    long long key; /* of its cell; FREE_KEY while on the free list (linked through `next`) */
    int32_t slot;  /* in the store */
    int32_t next;
    int32_t prev;
} Node;

typedef struct {
    PyObject_HEAD
    Store *store;
    int shift;
    long long half, w;
    double scale, cellrad;
    int has_tree;
    long long imin, imax, jmin, jmax; /* bounding box of every cell created (never shrinks) */
    Entry *tab;
    Py_ssize_t mask, used, tombs; /* used: non-empty cells */
    Node *nodes;
    Py_ssize_t ncap, ntop;
    int32_t nfree_head;
} Cells;

static inline Py_ssize_t
cell_hash(Cells *c, long long key)
{
    long long i = floor_shift(key + c->half, c->shift);
    long long j = key - i * c->w;
    uint64_t h = (uint64_t)i * 0x9E3779B97F4A7C15ULL;
    h ^= h >> 29;
    return (Py_ssize_t)((h + (uint64_t)j) & (uint64_t)c->mask);
}

/* Index of the entry holding `key`, or -1. */
static inline Py_ssize_t
cell_find(Cells *c, long long key)
{
    Py_ssize_t at = cell_hash(c, key);
    for (;;) {
        Entry *e = &c->tab[at];
        if (e->head == EMPTY)
            return -1;
        if (e->head != TOMB && e->key == key)
            return at;
        at = (at + 1) & c->mask;
    }
}

static int
cells_resize(Cells *c, Py_ssize_t size)
{
    Entry *tab = PyMem_Malloc((size_t)size * sizeof(Entry));
    if (tab == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t n = 0; n < size; n++)
        tab[n].head = EMPTY;
    Entry *old = c->tab;
    Py_ssize_t oldsize = old ? c->mask + 1 : 0;
    c->tab = tab;
    c->mask = size - 1;
    c->tombs = 0;
    for (Py_ssize_t n = 0; n < oldsize; n++) {
        if (old[n].head >= 0) {
            Py_ssize_t at = cell_hash(c, old[n].key);
            while (tab[at].head != EMPTY)
                at = (at + 1) & c->mask;
            tab[at] = old[n];
        }
    }
    PyMem_Free(old);
    return 0;
}

/* Link node `nd` into the cell `key`, creating the cell when it is new. */
static int
cells_link(Cells *c, int32_t nd, long long key)
{
    Py_ssize_t at = cell_find(c, key);
    if (at < 0) {
        if (2 * (c->used + c->tombs + 1) > c->mask + 1) {
            Py_ssize_t size = c->mask + 1;
            while (4 * (c->used + 1) > size)
                size *= 2;
            if (cells_resize(c, size))
                return -1;
        }
        at = cell_hash(c, key);
        while (c->tab[at].head >= 0)
            at = (at + 1) & c->mask;
        if (c->tab[at].head == TOMB)
            c->tombs--;
        c->tab[at].key = key;
        c->tab[at].head = -3; /* set below */
        c->used++;
        long long i = floor_shift(key + c->half, c->shift);
        long long j = key - i * c->w;
        if (i < c->imin) c->imin = i;
        if (i > c->imax) c->imax = i;
        if (j < c->jmin) c->jmin = j;
        if (j > c->jmax) c->jmax = j;
        c->nodes[nd].next = -1;
    }
    else {
        c->nodes[nd].next = c->tab[at].head;
        c->nodes[c->tab[at].head].prev = nd;
    }
    c->nodes[nd].prev = -1;
    c->nodes[nd].key = key;
    c->tab[at].head = nd;
    return 0;
}

static void
cells_unlink(Cells *c, int32_t nd)
{
    Node *n = &c->nodes[nd];
    if (n->next >= 0)
        c->nodes[n->next].prev = n->prev;
    if (n->prev >= 0) {
        c->nodes[n->prev].next = n->next;
        return;
    }
    Py_ssize_t at = cell_find(c, n->key); /* n heads its cell */
    if (n->next >= 0) {
        c->tab[at].head = n->next;
    }
    else {
        c->tab[at].head = TOMB;
        c->used--;
        c->tombs++;
    }
}

#define FREE_KEY (-1 - (1LL << 62)) /* the key of a free node: no cell has it */

static int32_t
node_arg(Cells *c, PyObject *arg)
{
    long v = PyLong_AsLong(arg);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < 0 || v >= c->ntop || c->nodes[v].key == FREE_KEY) {
        PyErr_Format(PyExc_IndexError, "no node %ld", v);
        return -1;
    }
    return (int32_t)v;
}

static PyObject *
Cells_add(Cells *c, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "add(key, slot)");
        return NULL;
    }
    long long key = PyLong_AsLongLong(args[0]);
    if (key == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t slot = store_slot_arg(c->store, args[1]);
    if (slot < 0)
        return NULL;
    int32_t nd;
    if (c->nfree_head >= 0) {
        nd = c->nfree_head;
        c->nfree_head = c->nodes[nd].next;
    }
    else {
        if (c->ntop == c->ncap) {
            Py_ssize_t cap = c->ncap ? 2 * c->ncap : 64;
            if (cap > INT32_MAX) {
                PyErr_SetString(PyExc_OverflowError, "too many members in one map");
                return NULL;
            }
            Node *nodes = PyMem_Realloc(c->nodes, (size_t)cap * sizeof(Node));
            if (nodes == NULL)
                return PyErr_NoMemory();
            c->nodes = nodes;
            c->ncap = cap;
        }
        nd = (int32_t)c->ntop++;
    }
    c->nodes[nd].slot = (int32_t)slot;
    if (cells_link(c, nd, key)) {
        c->nodes[nd].key = FREE_KEY;
        c->nodes[nd].next = c->nfree_head;
        c->nfree_head = nd;
        return NULL;
    }
    return PyLong_FromLong(nd);
}

static PyObject *
Cells_remove(Cells *c, PyObject *arg)
{
    int32_t nd = node_arg(c, arg);
    if (nd < 0)
        return NULL;
    cells_unlink(c, nd);
    c->nodes[nd].key = FREE_KEY;
    c->nodes[nd].next = c->nfree_head;
    c->nfree_head = nd;
    Py_RETURN_NONE;
}

static PyObject *
Cells_relink(Cells *c, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "relink(node, key)");
        return NULL;
    }
    int32_t nd = node_arg(c, args[0]);
    if (nd < 0)
        return NULL;
    long long key = PyLong_AsLongLong(args[1]);
    if (key == -1 && PyErr_Occurred())
        return NULL;
    if (key == c->nodes[nd].key)
        Py_RETURN_NONE;
    cells_unlink(c, nd);
    if (cells_link(c, nd, key)) {
        c->nodes[nd].key = FREE_KEY; /* lost: the caller's index is now inconsistent */
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
Cells_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"store", "shift", "scale", "cellrad", "has_tree", NULL};
    PyObject *store;
    int shift, has_tree;
    double scale, cellrad;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!iddp", kwlist, &Store_Type, &store, &shift,
                                     &scale, &cellrad, &has_tree))
        return NULL;
    if (shift < 1 || shift > 40) {
        PyErr_SetString(PyExc_ValueError, "shift must be in 1..40");
        return NULL;
    }
    Cells *c = (Cells *)type->tp_alloc(type, 0);
    if (c == NULL)
        return NULL;
    c->store = (Store *)Py_NewRef(store);
    c->shift = shift;
    c->w = 1LL << shift;
    c->half = 1LL << (shift - 1);
    c->scale = scale;
    c->cellrad = cellrad;
    c->has_tree = has_tree;
    c->imin = c->jmin = 1LL << 62;
    c->imax = c->jmax = -(1LL << 62);
    c->nfree_head = -1;
    if (cells_resize(c, 16)) {
        Py_DECREF(c);
        return NULL;
    }
    return (PyObject *)c;
}

static int
Cells_traverse(Cells *c, visitproc visit, void *arg)
{
    Py_VISIT(c->store);
    return 0;
}

static int
Cells_clear(Cells *c)
{
    Py_CLEAR(c->store);
    return 0;
}

static void
Cells_dealloc(Cells *c)
{
    PyObject_GC_UnTrack(c);
    Cells_clear(c);
    PyMem_Free(c->tab);
    PyMem_Free(c->nodes);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static Py_ssize_t
Cells_len(Cells *c)
{
    return c->used;
}

static PyMethodDef Cells_methods[] = {
    {"add", (PyCFunction)(void (*)(void))Cells_add, METH_FASTCALL,
     "add(key, slot) -> node: put the store's slot in cell key."},
    {"remove", (PyCFunction)Cells_remove, METH_O, "remove(node)."},
    {"relink", (PyCFunction)(void (*)(void))Cells_relink, METH_FASTCALL,
     "relink(node, key): move the node to cell key."},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods Cells_as_sequence = {.sq_length = (lenfunc)Cells_len};

static PyTypeObject Cells_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "dispatch.geo._speedups.Cells",
    .tp_doc = "Cells(store, shift, scale, cellrad, has_tree): one map's cells, packed.",
    .tp_basicsize = sizeof(Cells),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = Cells_new,
    .tp_dealloc = (destructor)Cells_dealloc,
    .tp_traverse = (traverseproc)Cells_traverse,
    .tp_clear = (inquiry)Cells_clear,
    .tp_methods = Cells_methods,
    .tp_as_sequence = &Cells_as_sequence,
};

/* -- the search ---------------------------------------------------------------------------------- */

typedef struct {
    double d2;
    double dist;
    PyObject *rec; /* strong */
} Cand;

typedef struct {
    double lon, lat, qx, qy, qz, cq, lon_room, fresh;
    PyObject *exclude; /* NULL when empty */
    Py_ssize_t k;
    long ring_limit;
    double tree_budget;
    int scan_fallback;
    /* accumulated over both maps, as `cands`, `best` and `thr` in index.py */
    Cand *cands;
    Py_ssize_t ncands, capcands;
    double *best;
    Py_ssize_t nbest;
    double thr;
} Search;

static int
add_cand(Search *s, double d2, PyObject *rec)
{
    if (s->ncands == s->capcands) {
        Py_ssize_t cap = s->capcands ? 2 * s->capcands : 16;
        Cand *c = PyMem_Realloc(s->cands, (size_t)cap * sizeof(Cand));
        if (c == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        s->cands = c;
        s->capcands = cap;
    }
    s->cands[s->ncands].d2 = d2;
    s->cands[s->ncands].rec = Py_NewRef(rec);
    s->ncands++;
    return 0;
}

/* The inner loop of CellIndex._search over one cell (its list of nodes from `nd`). */
static int
visit_cell(Search *s, Cells *c, int32_t nd)
{
    Point *pts = c->store->pts;
    while (nd >= 0) {
        Node *n = &c->nodes[nd];
        Point *p = &pts[n->slot];
        nd = n->next;
        if (p->rec == NULL) /* only while the collector tears a dead index down */
            continue;
        double dx = p->x - s->qx;
        double dy = p->y - s->qy;
        double dz = p->z - s->qz;
        double d2 = dx * dx + dy * dy + dz * dz;
        if (!(d2 <= s->thr) || p->ts < s->fresh)
            continue;
        PyObject *rec = p->rec;
        if (s->exclude != NULL) {
            PyObject *rid = resp_slot(rec, R_RID);
            if (rid == NULL)
                return -1;
            Py_INCREF(rid);
            int ex = PySequence_Contains(s->exclude, rid);
            Py_DECREF(rid);
            if (ex < 0)
                return -1;
            if (ex)
                continue;
            /* __contains__ could have run Python code that changed the index */
            pts = c->store->pts;
        }
        if (add_cand(s, d2, rec))
            return -1;
        double kth = s->nbest >= s->k ? s->best[s->k - 1] : INFINITY;
        if (d2 < kth) {
            /* bisect.insort, then keep the k smallest */
            Py_ssize_t at = s->nbest;
            while (at > 0 && s->best[at - 1] > d2)
                at--;
            Py_ssize_t len = s->nbest < s->k ? s->nbest + 1 : s->k;
            for (Py_ssize_t m = len - 1; m > at; m--)
                s->best[m] = s->best[m - 1];
            s->best[at] = d2;
            s->nbest = len;
            if (len == s->k) {
                double ch = sqrt(s->best[len - 1]) + chord_delta;
                s->thr = ch * ch;
            }
        }
    }
    return 0;
}

static inline int
visit_key(Search *s, Cells *c, long long key)
{
    Py_ssize_t at = cell_find(c, key);
    return at < 0 ? 0 : visit_cell(s, c, c->tab[at].head);
}

/* index.py's _rings_cost */
static double
rings_cost(double thr, long long r, double cellrad, double cq, double lon_room)
{
    double c = sqrt(thr);
    if (cq * sin(lon_room) <= c)
        return INFINITY;
    double rings = asin(c / cq) / cellrad + 1.0;
    if (rings < (double)r)
        return INFINITY;
    return 4.0 * (rings * rings - (double)r * (double)r);
}

/* CellIndex._search on one map: 0 done, 1 the tree search is due (give up), -1 error. */
static int
search_cells(Search *s, Cells *c)
{
    double fy = s->lat * c->scale;
    double fx = s->lon * c->scale;
    long long i = (long long)floor(fy);
    long long j = (long long)floor(fx);
    double fmin = fy - (double)i;
    if (fmin > 0.5)
        fmin = 1.0 - fmin;
    double gmin = fx - (double)j;
    if (gmin > 0.5)
        gmin = 1.0 - gmin;
    long long w = c->w;
    long long r = 0;
    if (c->imin - i > r) r = c->imin - i;
    if (i - c->imax > r) r = i - c->imax;
    if (c->jmin - j > r) r = c->jmin - j;
    if (j - c->jmax > r) r = j - c->jmax;
    long long rmax = i - c->imin;
    if (c->imax - i > rmax) rmax = c->imax - i;
    if (j - c->jmin > rmax) rmax = j - c->jmin;
    if (c->jmax - j > rmax) rmax = c->jmax - j;
    long long visited = 0;
    long long base = i * w + j;

    while (r <= rmax) {
        long long nring = r ? 8 * r : 1;
        if (visited + nring > c->used && s->scan_fallback) {
            /* scanning what is left is cheaper than the next ring */
            Py_ssize_t size = c->mask + 1;
            for (Py_ssize_t at = 0; at < size; at++) {
                Entry *e = &c->tab[at];
                if (e->head < 0)
                    continue;
                long long ci = floor_shift(e->key + c->half, c->shift);
                long long cj = e->key - ci * w;
                if ((llabs(ci - i) >= r || llabs(cj - j) >= r) && visit_cell(s, c, e->head))
                    return -1;
            }
            rmax = -1;
        }
        else if (r > s->ring_limit && c->has_tree &&
                 (s->thr == INFINITY ||
                  rings_cost(s->thr, r, c->cellrad, s->cq, s->lon_room) > s->tree_budget)) {
            return 1;
        }
        else {
            if (r == 0) {
                if (visit_key(s, c, base))
                    return -1;
            }
            else {
                for (long long dj = -r; dj <= r; dj++) {
                    if (visit_key(s, c, base - r * w + dj) || visit_key(s, c, base + r * w + dj))
                        return -1;
                }
                for (long long di = -r + 1; di < r; di++) {
                    if (visit_key(s, c, base + di * w - r) || visit_key(s, c, base + di * w + r))
                        return -1;
                }
            }
            visited += nring;
        }
        if (s->thr < INFINITY) {
            double dphi = ((double)r + fmin) * c->cellrad;
            double lb = dphi < Py_MATH_PI ? 2.0 * sin(dphi * 0.5) : 2.0;
            double dlam = ((double)r + gmin) * c->cellrad;
            if (dlam > s->lon_room)
                dlam = s->lon_room;
            double lb2 = s->cq * sin(dlam);
            if (lb2 < lb)
                lb = lb2;
            lb -= bound_eps;
            if (lb > 0.0 && lb * lb > s->thr)
                break;
        }
        r++;
    }
    return 0;
}

/* dispatch.geo.distance.haversine_m, operation for operation */
static double
haversine_m(double lon1, double lat1, double lon2, double lat2)
{
    double p1 = lat1 * DEG2RAD;
    double p2 = lat2 * DEG2RAD;
    double s_dp = sin((p2 - p1) * 0.5);
    double s_dl = sin(((lon2 - lon1) * DEG2RAD) * 0.5);
    double a = s_dp * s_dp + cos(p1) * cos(p2) * s_dl * s_dl;
    if (a > 1.0)
        a = 1.0;
    return 2.0 * earth_radius_m * asin(sqrt(a));
}

static int
cand_order(const void *pa, const void *pb)
{
    const Cand *a = pa, *b = pb;
    if (a->dist < b->dist)
        return -1;
    if (a->dist > b->dist)
        return 1;
    /* ties to the smaller id; ids were checked to be str, whose comparison cannot fail */
    return PyUnicode_Compare(*(PyObject **)((char *)a->rec + resp_off[R_RID]),
                             *(PyObject **)((char *)b->rec + resp_off[R_RID]));
}

static int
is_empty_container(PyObject *o)
{
    if (PyTuple_CheckExact(o))
        return PyTuple_GET_SIZE(o) == 0;
    if (PyAnySet_CheckExact(o))
        return PySet_GET_SIZE(o) == 0;
    if (PyDict_CheckExact(o))
        return PyDict_GET_SIZE(o) == 0;
    return 0;
}

/* Rank the candidates within the final threshold by haversine (then id) into a list. */
static PyObject *
ranked(Search *s)
{
    Py_ssize_t kept = 0, n = 0;
    int bad = 0;
    for (; n < s->ncands && !bad; n++) {
        Cand c = s->cands[n];
        if (!(c.d2 <= s->thr)) {
            Py_DECREF(c.rec);
            continue;
        }
        PyObject *olon = resp_slot(c.rec, R_LON);
        PyObject *olat = resp_slot(c.rec, R_LAT);
        PyObject *orid = resp_slot(c.rec, R_RID);
        double rlon, rlat;
        if (olon == NULL || olat == NULL || orid == NULL || as_double(olon, &rlon) ||
            as_double(olat, &rlat)) {
            bad = 1;
        }
        else if (!PyUnicode_CheckExact(orid)) {
            PyErr_SetString(PyExc_TypeError, "responder ids must be str");
            bad = 1;
        }
        if (bad) {
            Py_DECREF(c.rec);
            continue;
        }
        c.dist = haversine_m(s->lon, s->lat, rlon, rlat);
        s->cands[kept++] = c;
    }
    for (Py_ssize_t m = n; m < s->ncands; m++)
        Py_DECREF(s->cands[m].rec);
    s->ncands = kept;
    if (bad)
        return NULL;
    qsort(s->cands, (size_t)kept, sizeof(Cand), cand_order);
    Py_ssize_t take = kept < s->k ? kept : s->k;
    PyObject *out = PyList_New(take);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t m = 0; m < take; m++) {
        PyObject *rid = *(PyObject **)((char *)s->cands[m].rec + resp_off[R_RID]);
        PyObject *d = PyFloat_FromDouble(s->cands[m].dist);
        PyObject *pair = d ? PyTuple_Pack(2, rid, d) : NULL;
        Py_XDECREF(d);
        if (pair == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, m, pair);
    }
    return out;
}

PyDoc_STRVAR(nearest_doc,
"nearest(c1, c2, lon, lat, fresh, exclude, k, ring_limit, tree_budget, scan_fallback)\n\n"
"What CellIndex.nearest answers over the Cells c1 and c2 (either may be None), or None when\n"
"the search would need the best-first tree search: the caller then runs the Python search.");

static PyObject *
nearest(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "nearest() takes 10 arguments");
        return NULL;
    }
    Search s = {0};
    Cells *cs[2] = {NULL, NULL};
    for (int n = 0; n < 2; n++) {
        if (args[n] == Py_None)
            continue;
        if (!Py_IS_TYPE(args[n], &Cells_Type)) {
            PyErr_SetString(PyExc_TypeError, "c1 and c2 must be Cells or None");
            return NULL;
        }
        cs[n] = (Cells *)args[n];
    }
    if (as_double(args[2], &s.lon) || as_double(args[3], &s.lat) || as_double(args[4], &s.fresh))
        return NULL;
    if (!(s.lat >= -90.0 && s.lat <= 90.0 && s.lon >= -180.0 && s.lon <= 180.0)) {
        /* cell arithmetic below assumes a point on the globe (and no NaN) */
        PyErr_Format(PyExc_ValueError, "query point out of range: lon=%R lat=%R", args[2], args[3]);
        return NULL;
    }
    s.exclude = is_empty_container(args[5]) ? NULL : args[5];
    s.k = PyLong_AsSsize_t(args[6]);
    if (s.k == -1 && PyErr_Occurred())
        return NULL;
    s.ring_limit = PyLong_AsLong(args[7]);
    if ((s.ring_limit == -1 && PyErr_Occurred()) || as_double(args[8], &s.tree_budget))
        return NULL;
    s.scan_fallback = PyObject_IsTrue(args[9]);
    if (s.scan_fallback < 0)
        return NULL;
    if (s.k <= 0)
        return PyList_New(0);

    double p = s.lat * DEG2RAD;
    double q = s.lon * DEG2RAD;
    s.cq = cos(p);
    s.qx = s.cq * cos(q);
    s.qy = s.cq * sin(q);
    s.qz = sin(p);
    double room = 180.0 - s.lon < 180.0 + s.lon ? 180.0 - s.lon : 180.0 + s.lon;
    s.lon_room = room * DEG2RAD;
    if (s.lon_room > HALF_PI)
        s.lon_room = HALF_PI;
    s.thr = INFINITY;
    double best_small[8];
    s.best = s.k <= 8 ? best_small : PyMem_Malloc((size_t)s.k * sizeof(double));
    if (s.best == NULL)
        return PyErr_NoMemory();

    PyObject *out = NULL;
    int rc = 0;
    for (int n = 0; n < 2 && rc == 0; n++) {
        if (cs[n] != NULL) {
            Py_INCREF(cs[n]); /* a Python __contains__ could drop the map under us */
            rc = search_cells(&s, cs[n]);
            Py_DECREF(cs[n]);
        }
    }
    if (rc == 0)
        out = ranked(&s);
    else if (rc > 0)
        out = Py_NewRef(Py_None);
    for (Py_ssize_t n = 0; n < s.ncands; n++)
        Py_DECREF(s.cands[n].rec);
    PyMem_Free(s.cands);
    if (s.best != best_small)
        PyMem_Free(s.best);
    return out;
}

/* -- the module ---------------------------------------------------------------------------------- */

PyDoc_STRVAR(setup_doc,
"setup(resp_type, earth_radius_m, chord_delta, bound_eps)\n\n"
"Bind the module to index.py's record class and constants (called once, on import).");

static PyObject *
setup(PyObject *self, PyObject *args)
{
    PyObject *rt;
    double er, cd, be;
    if (!PyArg_ParseTuple(args, "O!ddd", &PyType_Type, &rt, &er, &cd, &be))
        return NULL;
    Py_ssize_t off[R_NSLOTS];
    for (int i = 0; i < R_NSLOTS; i++) {
        PyObject *d = PyObject_GetAttrString(rt, resp_slots[i]);
        if (d == NULL)
            return NULL;
        int ok = Py_IS_TYPE(d, &PyMemberDescr_Type) &&
                 ((PyMemberDescrObject *)d)->d_member->type == T_OBJECT_EX;
        if (ok)
            off[i] = ((PyMemberDescrObject *)d)->d_member->offset;
        Py_DECREF(d);
        if (!ok) {
            PyErr_Format(PyExc_TypeError, "%s is not a __slots__ member", resp_slots[i]);
            return NULL;
        }
    }
    memcpy(resp_off, off, sizeof off);
    Py_XSETREF(resp_type, (PyTypeObject *)Py_NewRef(rt));
    earth_radius_m = er;
    chord_delta = cd;
    bound_eps = be;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"nearest", (PyCFunction)(void (*)(void))nearest, METH_FASTCALL, nearest_doc},
    {"setup", setup, METH_VARARGS, setup_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "dispatch.geo._speedups",
    "Compiled nearest-responder search for dispatch.geo.index (optional).", -1, methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    if (PyType_Ready(&Store_Type) < 0 || PyType_Ready(&Cells_Type) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Store", (PyObject *)&Store_Type) < 0 ||
        PyModule_AddObjectRef(m, "Cells", (PyObject *)&Cells_Type) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
