/*
 * A small JSON-like tree that reproduces qemu 7.2's QObject output: dicts
 * emit their keys in QDict hash-bucket order (qemu's --output=json and its
 * human "Format specific information" block both follow it).
 */
#ifndef VIMG_CORE_QOBJ_H
#define VIMG_CORE_QOBJ_H

#include <stdbool.h>
#include <stdint.h>

enum vimg_qtype { VIMG_Q_INT, VIMG_Q_UINT, VIMG_Q_BOOL, VIMG_Q_STR, VIMG_Q_DICT,
                  VIMG_Q_LIST, VIMG_Q_NULL };

struct vimg_qobj;

struct vimg_qobj *vimg_q_int(int64_t v);
struct vimg_qobj *vimg_q_uint(uint64_t v);
struct vimg_qobj *vimg_q_bool(bool v);
struct vimg_qobj *vimg_q_str(const char *s);
struct vimg_qobj *vimg_q_dict(void);
struct vimg_qobj *vimg_q_list(void);
void vimg_q_free(struct vimg_qobj *o);

/* Take ownership of val; a NULL val is ignored (allocation failure). */
void vimg_q_put(struct vimg_qobj *dict, const char *key, struct vimg_qobj *val);
void vimg_q_append(struct vimg_qobj *list, struct vimg_qobj *val);

enum vimg_qtype vimg_q_type(const struct vimg_qobj *o);
struct vimg_qobj *vimg_q_get(const struct vimg_qobj *dict, const char *key);
size_t vimg_q_count(const struct vimg_qobj *o);
struct vimg_qobj *vimg_q_index(const struct vimg_qobj *list, size_t i);
/* Scalar getters: 0 / "" / false when o is NULL or of another type. */
int64_t vimg_q_get_int(const struct vimg_qobj *o);
const char *vimg_q_get_str(const struct vimg_qobj *o);
bool vimg_q_get_bool(const struct vimg_qobj *o);

/* qemu's QDict hash of a key (bucket = hash % 512). */
unsigned vimg_q_hash(const char *key);

/* Pretty JSON as qemu prints it (4-space indent); malloc'ed, no trailing
 * newline. */
char *vimg_q_to_json(const struct vimg_qobj *o);
/* qemu's human dump of a format-specific dict ("key: value", '-' turned into
 * ' ', 4 spaces per level), starting at indent; malloc'ed. */
char *vimg_q_to_human(const struct vimg_qobj *o, int indent);

#endif
