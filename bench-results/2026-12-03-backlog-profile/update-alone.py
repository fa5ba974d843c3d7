import sys, time, os, datetime, threading
from pymongo import MongoClient, WriteConcern, IndexModel
from bson import ObjectId
N = int(sys.argv[1]); mode = sys.argv[2] if len(sys.argv) > 2 else "pipeline"
streams = int(os.environ.get("STREAMS", "0"))
c = MongoClient("mongodb://127.0.0.1:27777/?replicaSet=exp&directConnection=true")
db = c[f"exp{N}{mode}{streams}"]
db.drop_collection("m")
m = db.get_collection("m", write_concern=WriteConcern(w="majority"))
def idx(keys, name, **kw): return IndexModel(keys, name=name, **kw)
m.create_indexes([
 idx([("receiver",1)],"receiver_1"), idx([("delivered",1)],"delivered_1"),
 idx([("receiver",1),("delivered",1)],"rd"), idx([("receiver",1),("delivered",1),("_id",1)],"rdi"),
 idx([("delivered",1),("_id",1)],"di"),
 idx([("receiver",1),("_id",1)],"unacked", partialFilterExpression={"delivered":True,"ackedAt":{"$type":"null"}}),
 idx([("sender",1),("_id",1)],"si"),
 idx([("sender",1),("clientMsgId",1)],"sc",unique=True, partialFilterExpression={"clientMsgId":{"$type":"string"}}),
 idx([("deliveredAt",1)],"ttl", expireAfterSeconds=7*86400),
])
now = datetime.datetime.utcnow()
docs = [{"_id": ObjectId(), "receiver":"bob","sender":f"s{i%8}","chatId":"c","message":"x"*100,"timestamp":now,"delivered":False,"deliveredAt":None,"clientMsgId":f"k{i}"} for i in range(N)]
for i in range(0, N, 1000): m.insert_many(docs[i:i+1000])
ids = [d["_id"] for d in docs]
stop = False
def tail():
    with m.watch([{"$match":{"$or":[{"operationType":"insert"},{"operationType":"update","updateDescription.updatedFields.receiptFor":{"$exists":True}}]}}]) as s:
        while not stop:
            s.try_next()
ts = [threading.Thread(target=tail, daemon=True) for _ in range(streams)]
for t in ts: t.start()
time.sleep(1)
def upd(batch):
    f = {"_id":{"$in":batch},"delivered":False}
    if mode == "pipeline":
        u = [{"$set":{"delivered":True,"deliveredAt":"$$NOW","deliveredBy":"a","pushedAt":"$$NOW","updatedAt":"$$NOW","ackedAt":{"$ifNull":["$ackedAt","$$NOW"]},"receiptFor":"$sender"}}]
    else:
        n = datetime.datetime.utcnow()
        u = {"$set":{"delivered":True,"deliveredAt":n,"deliveredBy":"a","pushedAt":n,"updatedAt":n,"ackedAt":n,"receiptFor":"s"}}
    kw = {"hint":"_id_"} if os.environ.get("HINT") else {}
    return m.update_many(f, u, **kw)
# explain one batch first (not executed)
e = db.command("explain", {"update":"m","updates":[{"q":{"_id":{"$in":ids[:400]},"delivered":False},"u":{"$set":{"x":1}},"multi":True}]}, verbosity="executionStats")
w = e["queryPlanner"]["winningPlan"]; print("plan", str(w)[:200], "rejected", len(e["queryPlanner"]["rejectedPlans"]))
cpu0 = c.admin.command("serverStatus")["opLatencies"]["writes"]
t0 = time.time(); tot=0
B=400
for i in range(0, N, B):
    tot += upd(ids[i:i+B]).modified_count
dt = time.time()-t0
print(f"N={N} mode={mode} streams={streams} hint={bool(os.environ.get('HINT'))} modified={tot} {dt:.2f}s {dt/N*1e6:.0f} us/doc")
stop=True
