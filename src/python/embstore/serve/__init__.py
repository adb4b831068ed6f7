"""``embstore serve``: a read-only web server with a live page of a store's embeddings.

Run::

    python3 -m embstore.serve STORE_OR_MANIFEST [--host 127.0.0.1] [--port 8080] [--labels FILE]

(``embstore serve ...`` runs the same). It opens the store with a Reader (a manifest file of
shards with a ``ShardSet``, whose global rows it serves as one store), follows rows as writers
commit them (``Reader.wait``), prints the URL and serves the page at ``/`` until Ctrl-C. It binds
127.0.0.1 unless ``--host`` says otherwise; another host prints a warning, because there is no
authentication: anyone who can reach the port can read the embeddings. A server that listens on
loopback (any 127.0.0.0/8 address, ::1, localhost or a name of one) refuses requests whose Host
header is not a loopback address (127.0.0.1, [::1], ...), localhost or the --host name (DNS
rebinding: a page of another site reaching the server under that site's name); one bound to
every address (0.0.0.0, ::), which listens on loopback too, refuses Host names other than
localhost and this machine's name (``socket.gethostname()``) and answers any IP address. A
--host of network addresses only checks no Host (``app.HostCheck``).
``--port 0`` picks a free port.
Stopping: Ctrl-C or SIGTERM stops the server within about a second (exit status 0): the
computations queued are cancelled (their requests get a 503), requests being answered get 1 s to
finish, and computations still running then are not waited for. A second Ctrl-C or SIGTERM ends
the process at once, killed by the signal (exit status 130 or 143 in a shell), as the
command-line tool's long commands do.
Connections: one that sends no whole request within 10 s of its opening or of its last answer
(idle, kept alive, or a request sent half or a byte at a time), or whose answer has not moved
for 10 s (its client does not read), is closed (``app.kIdleSeconds``); a request being computed
is not cut.

Read-only: the server opens only Readers on the store and reads the labels file once at start;
no endpoint writes, deletes or reads any other file (the page's files are a fixed set inside this
package, plus Chart.js from Debian's libjs-chart.js at /usr/share/javascript/chart.js/).

Damage: before a request touches rows, the server compares the sizes of the store's files with
what its snapshot needs and checks that the store directory is still there; a failure is a 503
naming the file, and the server goes on answering. A store deleted and created again at the
same path (a run started over) is not followed: the server's Readers map the deleted store, so
every request gets a 503 naming both store ids until the server is restarted. A manifest's
shards are checked each as a single store is (also shards its refresh adds), and a 503 names the
shard. Caveat: a file shrunk by another program in the instant between that check and the read
still ends the server with SIGBUS (embstore itself never shrinks a store's files).
Rows are checked against their checksums where an answer returns them: ``/api/history`` and
``/api/neighbours`` refuse (503 naming the file, row, key and epoch) when a row they would return
(the key's rows; its row and its neighbours) fails; a projection leaves the sampled rows that
fail out of its fit and its points and counts them (``corrupt``), checked again at every
request. The rows a neighbour scan compares but does not return are read as mapped.
Truncates: the server reads each generation of the store through a Reader opened at it; the
files of an older one (deleted by the truncate) stay mapped only while a request still reads
its rows.

Labels (``--labels FILE``) colour the points: a JSON object ``{"KEY": LABEL, ...}`` or CSV lines
``KEY,LABEL`` (an optional ``key,label`` header line); see ``analysis.Labels``.

JSON API (GET only; every answer is JSON, except aiohttp's own text 400 for a request its
parser refuses before the app sees it, a request line or header over 8,190 bytes say, which is
one line on stderr; an error is ``{"error": MESSAGE}`` with status 400 for a
bad parameter (not a number, out of range, unknown name, given twice), 403 for a request whose
Host header the server refuses (above), 404 for an absent key or epoch, 405 for a
method other than GET, 422 for neighbours of a row holding NaN or Inf, 503 when
the store is damaged or gone (the message says which file) or the server is stopping, 500 for
anything else; the server keeps running).
Rows holding NaN or Inf have no place in a PCA or a distance: every endpoint leaves them out and
says how many it left out (``non_finite``); no answer holds NaN (not JSON).
Keys and epochs (uint64, 0 .. 2**64-1) are given as decimal integers in parameters and are
decimal *strings* in every answer (``"epoch": "9223372036854775813"``, ``"keys": ["7", ...]``):
a JSON number above 2**53 comes out of JavaScript's JSON.parse rounded to another key or epoch.
Row numbers, counts and ``generation`` are JSON numbers (a store holds at most 2**40 rows).

``/api/stats``
    ``rows``, ``generation`` (the store's generation, which a truncate changes; for a manifest a
    list, one per shard), ``rows_per_second`` (commits seen in the last 5 s, since the latest
    truncate), ``epoch_count``, ``epochs``
    (``[{"epoch", "rows"}]``, the latest 10,000), ``bytes_on_disk`` (blocks allocated to the
    store's files), ``file_bytes`` (data + index file sizes; a manifest's: its shards'
    together), ``last_commit_unix`` (seconds
    since the Unix epoch of the latest commit, as its writer recorded it in the store:
    ``info()["last_commit_unix_ns"]`` / 1e9, the newest of the shards; null when the store
    records none: no commit yet, or only commits by libraries older than format 1.3), ``dtype``,
    ``dim``, ``store``, ``key_index`` (true when lookups use the store's key index, or for a
    manifest each shard's; false when the store, or any shard, keeps none and they scan),
    ``labels`` (labelled keys, or null), ``label_names``.
``/api/epochs``
    ``rows``, ``epoch_count``, ``epochs`` as in stats.
``/api/projection?epoch=E&limit=N``
    A 2-D PCA projection of epoch E (default: the newest): a random sample of at most N of its
    rows (default 5,000, at most 20,000; the same sample while the epoch's row count does not
    change), centred on the sample mean and projected on its first two principal directions.
    The directions are fitted on a random 2,000 of the sampled rows: exactly (eigenvectors of
    their covariance) up to dim 128, by randomized subspace iteration (numpy QR and SVD) above;
    signs are fixed so that each direction's largest element is positive. Returns ``epoch``,
    ``generation`` (as in stats), ``epoch_rows``, ``sampled``, ``explained_variance`` (two
    fractions), ``x``, ``y``, ``keys``, ``rows``, ``non_finite`` (sampled rows left out: NaN or
    Inf; ``sampled`` counts the others), ``corrupt`` (sampled rows left out: they fail their
    checksum, a damaged store; ``sampled`` does not count them), ``labels`` (per point an index into ``label_names``, -1
    without a label; null without a labels file), ``label_names``.
``/api/neighbours?key=K&epoch=E&k=N``
    The N (1 .. 100, default 10) rows of epoch E (default: the newest) nearest to key K's row at
    that epoch, in Euclidean distance, nearest first, leaving out K's own rows and rows holding
    NaN or Inf (422 when K's row holds one). Epochs of more than 1,000,000 rows are searched in a
    random sample of that size (``exact`` false). Returns ``key``, ``epoch``, ``row``, ``x``/``y``
    (K in the epoch's projection at the default sample), ``epoch_rows``, ``scanned``, ``exact``,
    ``non_finite`` (rows scanned and left out: NaN or Inf), ``neighbours``
    (``[{"key", "row", "distance", "label", "x", "y"}]``).
``/api/history?key=K``
    Key K's row at each epoch holding it (its latest row there, as lookups take it: an earlier
    row of K at the same epoch, appended again since, is not listed; of a manifest, the last
    shard's), of the latest 1,000 such epochs, in commit (row) order: ``rows``, ``epochs``,
    ``total_epochs`` (epochs holding K), and ``trajectory``: per epoch (the latest 100),
    ``{"epoch", "row", "x", "y"}`` where the key's vector at that epoch is projected with
    *that epoch's own*
    PCA basis (the one ``/api/projection?epoch=E`` draws at the default sample). Each point
    therefore says where the sample sits inside its epoch's cloud; the bases of two epochs
    differ, so the path between points is not a motion in one fixed space. An epoch where the
    key's vector holds NaN or Inf has no point; ``non_finite`` counts them.
    Cost: one vectorised key-index lookup per epoch of the store (``Reader.find_many``), never
    a list of every version of K (a key appended millions of times took seconds and hundreds
    of MB that way, holding up ``/api/stats``).

The page (``/``) polls ``/api/stats`` every second: figures update live, the epoch slider
follows new epochs (unless moved by hand) and the projection is drawn at once for a new epoch and
redrawn at most every 5 s while its epoch gains rows (each draw samples, fits and projects on the
server: CPU a writer on the same machine would miss); redrawn at once after a truncate (the
generation changed), and when a truncate removed the epoch shown the page says so.
Searching a key draws its neighbours at the chosen epoch and its trajectory (as above); where the
key has no neighbours at that epoch (not written there yet), the trajectory stays and the page
says why.
Computation: float64 stores are computed in float64, the other dtypes in float32 (their values are
exact there, in half the memory); a neighbour scan compares its rows in steps of bounded bytes.
"""

__all__ = ["main"]


def main(argv=None) -> int:
    """Runs the server (the command line of ``python3 -m embstore.serve``)."""
    from .__main__ import main as run
    return run(argv)
